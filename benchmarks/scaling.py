"""PEEL's and rMLE's time and peak memory per image as the input grows, and the fitted growth exponent.

    python benchmarks/scaling.py                               # 32, 64, 128, 224 px, float32, the CPU
    python benchmarks/scaling.py --dtype float64 --sizes 64 128 224
    python benchmarks/scaling.py --device cuda                 # on a GPU (says so and stops where there is none)

The target is the zoo's ImageNet-stem ResNet-18 (random weights, seed 0, eval mode), cut after ``layer1``;
the attacked images are the two real portraits that ship offline (``datasets.portraits``: scikit-image's
astronaut and matplotlib's Grace Hopper) at each size. Both attacks get the same end-to-end budget
(``--evaluations`` client forward + backward passes per image, split across refined PEEL's two starts) and
the same TV weight (rMLE's default, 0.03: PEEL's 0.3 was tuned on 32 px digits and stops the fit early on
these images); PEEL's block-wise stage comes on top of its budget and is in its time.

Per size it prints seconds per image, the peak resident memory the attack call on both images added (MiB,
``evaluation.memory.PeakMemory``), PSNR (dB), the evaluations used per image and the PSNR of PEEL's block-wise
image (the refinement's start); then, per attack, the exponent ``k``
of ``time ∝ pixels^k`` fitted by least squares on log-log over the sizes from 64 px up (1 = linear in
pixels). Prints numbers; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from leakbench import attacks
from leakbench.contracts import AttackContext
from leakbench.evaluation.memory import PeakMemory
from leakbench.splitnn import datasets, zoo
from leakbench.splitnn.split import split


def attack_specs(evaluations: int, tv_weight: float, dtype: str) -> dict[str, tuple[str, dict]]:
    """label -> (attack name, params): both at the same budget, TV weight and dtype."""
    common = {"max_evaluations": evaluations, "tv_weight": tv_weight, "dtype": dtype}
    return {"peel": ("peel", {**common, "refine_iter": evaluations}),
            "rmle": ("rmle", {**common, "iterations": evaluations})}


def measure(size: int, specs: dict[str, tuple[str, dict]], device: torch.device) -> list[dict]:
    """One row per attack at ``size`` px: seconds per image, the MiB the call added (both images at once), mean
    PSNR and evaluations per image."""
    torch.manual_seed(0)
    model = zoo.get("resnet18", num_classes=10).eval()
    client, _ = split(model, "layer1")
    client = client.eval().to(device)
    truth = datasets.get("portraits", size=size).x_test.to(device)
    with torch.no_grad():
        features = client(truth)
    rows = []
    for label, (name, params) in specs.items():
        attack = attacks.get(name, **params)
        with PeakMemory() as memory:
            start = time.perf_counter()
            recon = attack.reconstruct(client, features, AttackContext(image_shape=tuple(truth.shape[1:])))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        mse = (recon.images.double() - truth.double()).pow(2).flatten(1).mean(1)
        start = recon.alternatives.get("blockwise", recon.images)  # PEEL's block-wise image, the refinement's start
        start_mse = (start.double() - truth.double()).pow(2).flatten(1).mean(1)
        spent = recon.diagnostics["budget"]
        rows.append({"attack": label, "size": size, "seconds_per_image": seconds / len(truth),
                     "rise_mb": memory.rise_mb if memory.rise_mb is not None else math.nan,
                     "cuda_mb": memory.peak_cuda_mb,
                     "psnr": float((-10 * mse.log10()).mean()),
                     "blockwise_psnr": float((-10 * start_mse.log10()).mean()) if "blockwise" in recon.alternatives
                     else math.nan,
                     "evaluations": spent["end_to_end_evaluations"],  # already means over images
                     "blockwise_evaluations": spent["blockwise_evaluations"]})
    return rows


def exponent(rows: list[dict], attack: str, smallest: int = 64) -> float:
    """``k`` in ``seconds ∝ pixels^k``, least squares on log-log over the sizes >= ``smallest``."""
    chosen = [r for r in rows if r["attack"] == attack and r["size"] >= smallest]
    if len(chosen) < 2:
        return math.nan
    pixels = np.log([r["size"] ** 2 for r in chosen])
    seconds = np.log([r["seconds_per_image"] for r in chosen])
    return float(np.polyfit(pixels, seconds, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    parser.add_argument("--evaluations", type=int, default=500, help="end-to-end evaluations per image")
    parser.add_argument("--tv-weight", type=float, default=0.03)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing measured")
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ResNet-18 (ImageNet stem) cut after layer1, 2 portraits, {args.dtype}, {args.evaluations} end-to-end "
          f"evaluations per image, TV {args.tv_weight}, on {name}")
    specs = attack_specs(args.evaluations, args.tv_weight, args.dtype)
    rows = []
    print(f"{'attack':<6} {'size':>5} {'s/image':>8} {'MiB added':>9} {'PSNR':>6} {'evals':>6} {'block evals':>11} "
          f"{'block PSNR':>10}")
    for size in args.sizes:
        for row in measure(size, specs, device):
            rows.append(row)
            print(f"{row['attack']:<6} {row['size']:>5} {row['seconds_per_image']:>8.2f} "
                  f"{row['rise_mb']:>9.1f} {row['psnr']:>6.2f} {row['evaluations']:>6.0f} "
                  f"{row['blockwise_evaluations']:>11.0f} {row['blockwise_psnr']:>10.2f}", flush=True)
    for attack in specs:
        print(f"{attack}: time per image grows as pixels^{exponent(rows, attack):.2f} "
              f"(least squares over {[s for s in args.sizes if s >= 64]} px)")


if __name__ == "__main__":
    main()
