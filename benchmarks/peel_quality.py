"""PEEL (paper solver, default solver, refined) against rMLE on the same test images, per architecture and cut.

Prints a Markdown table (image MSE / PSNR / SSIM, per-block relative error of the recovered block
inputs, scored here after the attack from ``Reconstruction.intermediates``, end-to-end evaluations per
image, wall time), then a summary (MSE per method side by side, and the default block solver's speedup
over the paper solver in the same run), and writes the full table as CSV. Run (all architectures,
about 24 min on 2 CPU cores):

    .venv/bin/python benchmarks/peel_quality.py --images 16 --out results/benchmarks/peel_quality.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from leakbench import attacks
from leakbench.attacks.peel import stage_input_errors
from leakbench.evaluation.metrics import image_metrics
from leakbench.splitnn import TrainConfig, datasets, split, train, zoo

ARCHITECTURES = {
    # name: (how to get the model, cuts)
    "resnet20_trained": (lambda: train(TrainConfig("resnet20", "digits", epochs=10), progress=False).model,
                         ["layer1", "layer2", "layer3"]),
    "resnet20_authors": (lambda: zoo.get("resnet20", norm="none", post_relu=False), ["layer1", "layer2", "layer3"]),
    "peel_resnet18_w16": (lambda: zoo.get("peel_resnet18", stem="small", width=16), ["layer1", "layer2"]),
    "resnet18_imagenet_stem_trained": (
        lambda: train(TrainConfig("resnet18", "digits", model_params={"width": 16}, epochs=10),
                      progress=False).model, ["layer1", "layer2"]),
    # IR blocks: BN-conv-PReLU-conv-BN, no ReLU after the addition (the face backbones' block)
    "ir18_w16_trained": (lambda: train(TrainConfig("ir18", "digits", model_params={"width": 16}, epochs=10),
                                       progress=False).model, ["layer1", "layer2"]),
}


def _row(arch: str, cut: str, method: str, images: torch.Tensor, truth: torch.Tensor, seconds: float,
         block_errors: list[float] | None, evaluations: float = 0.0) -> dict:
    m = image_metrics(images, truth)
    return {"architecture": arch, "cut": cut, "method": method,
            "mse": sum(m["mse"]) / len(m["mse"]), "psnr": sum(m["psnr"]) / len(m["psnr"]),
            "ssim": sum(m["ssim"]) / len(m["ssim"]), "seconds": seconds, "evaluations": evaluations,
            "block_errors": " ".join(f"{e:.1e}" for e in block_errors) if block_errors else ""}


def run(architectures: list[str], n_images: int) -> pd.DataFrame:
    data = datasets.get("digits")
    truth = data.x_test[:n_images]
    rows = []
    for arch in architectures:
        build, cuts = ARCHITECTURES[arch]
        torch.manual_seed(0)
        model = build().eval()
        for cut in cuts:
            client, _ = split(model, cut)
            with torch.no_grad():
                features = client(truth)
            shape = tuple(truth.shape[1:])
            for label, attack in [("peel paper solver (block-wise)", attacks.get("peel", solver="paper", refine=False)),
                                  ("peel refined (default)", attacks.get("peel"))]:
                start = time.perf_counter()
                rec = attack.reconstruct(client, features, attacks.AttackContext(image_shape=shape))
                seconds = time.perf_counter() - start
                errors = stage_input_errors(client, shape, rec.intermediates, truth)  # the truth enters only here
                if "blockwise" in rec.alternatives:  # the pure block-wise result of the same run
                    blockwise_seconds = sum(s["seconds"] for s in rec.diagnostics["stages"])
                    rows.append(_row(arch, cut, "peel default solver (block-wise)", rec.alternatives["blockwise"],
                                     truth, blockwise_seconds, errors))
                    errors = None
                rows.append(_row(arch, cut, label, rec.images, truth, seconds, errors,
                                 rec.diagnostics["budget"]["end_to_end_evaluations"]))
            start = time.perf_counter()
            rec = attacks.get("rmle").reconstruct(client, features, attacks.AttackContext(image_shape=shape))
            rows.append(_row(arch, cut, "rmle", rec.images, truth, time.perf_counter() - start, None,
                             rec.diagnostics["budget"]["end_to_end_evaluations"]))
            print(pd.DataFrame(rows[-4:]).to_markdown(index=False, floatfmt=".3g"), flush=True)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Image MSE per method side by side, and how much faster the default block solver is than the paper's."""
    short = {"peel paper solver (block-wise)": "paper", "peel default solver (block-wise)": "default",
             "peel refined (default)": "refined", "rmle": "rmle"}
    wide = table.assign(method=table["method"].map(short)).pivot_table(
        index=["architecture", "cut"], columns="method", values=["mse", "seconds"], sort=False)
    out = wide["mse"][list(short.values())].add_prefix("mse ")
    out["speedup default vs paper"] = wide["seconds"]["paper"] / wide["seconds"]["default"]
    return out.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--out", default="results/benchmarks/peel_quality.csv")
    args = parser.parse_args()
    start = time.perf_counter()
    table = run(args.architectures, args.images)
    print("\n" + table.to_markdown(index=False, floatfmt=".3g"))
    print("\n" + summary(table).to_markdown(index=False, floatfmt=".3g"))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
