"""Wall time of a grid run sequentially and on a 2-worker Dask LocalCluster, with the cache counts.

    python benchmarks/matrix_scaling.py                      # experiments/default.yaml, 16 images
    python benchmarks/matrix_scaling.py --images 4 --peel-iter 50 --rmle-iter 100   # a reduced grid

Both modes share one model cache, trained before timing (so neither pays for training), and write to
fresh stores. Prints numbers; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import yaml

from leakbench.evaluation import ExperimentConfig, Matrix, ResultStore
from leakbench.evaluation.executors import Dask, Sequential

ROOT = Path(__file__).resolve().parent.parent


def reduced(raw: dict, images: int | None, peel_iter: int | None, rmle_iter: int | None) -> dict:
    """The config with fewer images and solver iterations, to fit a small machine."""
    raw = copy.deepcopy(raw)
    if images:
        raw.setdefault("evaluation", {})["num_images"] = images
    for attack in raw["attacks"]:
        if isinstance(attack, dict):
            params = attack.setdefault("params", {})
            if attack["name"] == "peel" and peel_iter:
                params["max_iter"] = peel_iter
            if attack["name"] == "rmle" and rmle_iter:
                params["iterations"] = rmle_iter
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "default.yaml"))
    parser.add_argument("--images", type=int, help="evaluation.num_images (default: the config's)")
    parser.add_argument("--peel-iter", type=int, help="PEEL max_iter (default: the config's)")
    parser.add_argument("--rmle-iter", type=int, help="rMLE iterations (default: the config's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="sequential,dask", help="comma-separated: sequential, dask")
    args = parser.parse_args()

    raw = reduced(yaml.safe_load(Path(args.config).read_text()), args.images, args.peel_iter, args.rmle_iter)
    config = ExperimentConfig(raw, args.config)
    cells = config.cells()
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "models")
        warm = Matrix(config, cache_dir=cache, progress=False)
        start = time.perf_counter()
        for cell in cells:
            warm.trained(cell)
        print(f"{len(cells)} cells of {config.name} (images={config.evaluation['num_images']}); "
              f"training the models once: {time.perf_counter() - start:.1f} s")
        for mode in args.modes.split(","):
            executor = Sequential() if mode == "sequential" else Dask("local", args.workers)
            with ResultStore(Path(tmp) / f"{mode}.sqlite") as store:
                start = time.perf_counter()
                summary = Matrix(config, cache_dir=cache, progress=False).run(store, executor)
                elapsed = time.perf_counter() - start
            print(f"{executor.describe():<32} {elapsed:8.1f} s  {summary.done} done, {summary.failed} failed; "
                  f"{summary.cache_line()}")


if __name__ == "__main__":
    main()
