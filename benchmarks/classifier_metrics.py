"""Score a result store's stored reconstructions with the evaluation classifier (attack top-1/top-5, KNN
distance), beside the same scores of the true test images and of uniform noise, the two ends of the scale.

Useful for stores written before leakbench computed these metrics per cell. It trains (or loads from the
checkpoint cache) the evaluation classifier of the store's config. Run:

    .venv/bin/python benchmarks/classifier_metrics.py results/default
"""
from __future__ import annotations

import argparse
import json
import time

import pandas as pd
import torch

from leakbench.evaluation.config import Cell
from leakbench.evaluation.evaluators import Evaluators
from leakbench.evaluation.export import find_store
from leakbench.evaluation.image_sets import attacked_indices
from leakbench.evaluation.store import ResultStore
from leakbench.evaluation.tables import format_params
from leakbench.splitnn import datasets


def _means(metrics: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results directory or its results.sqlite")
    parser.add_argument("--cache-dir", help="checkpoint cache (default: $LEAKBENCH_CACHE or ~/.cache/leakbench)")
    args = parser.parse_args()
    with ResultStore(find_store(args.results)) as store:
        cells = store.cells()
        cells = cells[cells.status == "done"]
        recons = {key: store.reconstruction(key) for key in cells.cell_key}
    first = Cell(json.loads(cells.config_json.iloc[0]))
    data = datasets.get(first["dataset"]["name"], **first["dataset"]["params"])
    n = first["evaluation"]["num_images"]
    start = time.perf_counter()
    judge = Evaluators(args.cache_dir).classifier(first, data)
    print(f"evaluation classifier {judge.identity}: test accuracy {judge.test_accuracy:.4f} "
          f"(ready in {time.perf_counter() - start:.1f} s: trained now or loaded from the cache)")
    index = attacked_indices(data, first["seed"], n)
    noise = torch.rand(n, *data.shape, generator=torch.Generator().manual_seed(0))
    rows = [{"cell": "true test images", **_means(judge.classifier_metrics(data.x_test[index], data.y_test[index]))},
            {"cell": "uniform noise", **_means(judge.classifier_metrics(noise, data.y_test[index]))}]
    for _, c in cells.iterrows():
        if recons[c.cell_key] is not None:
            config = json.loads(c.config_json)  # each cell's own drawn images (by its seed)
            labels = data.y_test[attacked_indices(data, config["seed"], config["evaluation"]["num_images"])]
            rows.append({"cell": f"{c.defense}({format_params(c.defense_params)}) / {c.attack}", "psnr": c.psnr,
                         **_means(judge.classifier_metrics(recons[c.cell_key], labels))})
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
