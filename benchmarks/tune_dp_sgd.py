"""Tune DP-SGD for utility at a fixed privacy budget on a held-out validation split, as the DP literature does
(De et al. 2022; an untuned DP baseline is the straw man Aerni et al. 2024 warn about).

The digits training split is cut (stratified, seeded) into a tuning-train part and a validation part; the test
split is never read. Every candidate trains ResNet-20 with the one training loop (``splitnn.training.fit``: SGD
with momentum, cosine schedule) hooked by ``dp_sgd`` at the target epsilon (Opacus, Poisson sampling with the
candidate's expected batch size), so each candidate spends the same budget; the best validation accuracy wins.
With ``--baseline`` the same GroupNorm model and loop are also trained without DP (``groupnorm_baseline``), with
the winner's recipe and with the plain recipe of experiments/defenses.yaml. Prints one row per candidate and
the chosen recipe. A small grid (about 8 min on 2 cores):

    .venv/bin/python benchmarks/tune_dp_sgd.py --size 16 --batch-size 128 512 --lr 0.5 2.0 --clip 1.0 \\
        --epochs 10 25 --baseline

Augmentation multiplicity (De et al.) is not tried: the loop has no augmentation yet.
"""
from __future__ import annotations

import argparse
import itertools
import time
import warnings

import pandas as pd
import torch

from leakbench import defenses
from leakbench.splitnn import datasets, zoo
from leakbench.splitnn.training import accuracy, fit


#: The non-private recipe of experiments/defenses.yaml (batch size, lr, epochs): an lr tuned for clipped DP
#: gradients is far too large without clipping.
PLAIN_RECIPE = (64, 0.05, 10)


def validation_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, validation) of a stratified, seeded split of ``y``: ``fraction`` of each class held out."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in torch.unique(y):
        index = torch.nonzero(y == label).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        cut = round(fraction * len(index))
        held.append(index[:cut])
        train.append(index[cut:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def run(data: datasets.Dataset, train_idx: torch.Tensor, val_idx: torch.Tensor, defense: str, params: dict,
        batch_size: int, lr: float, epochs: int, seed: int) -> tuple[float, dict, float]:
    """Validation accuracy, the defense's report and the seconds of one training under ``defense``."""
    hooks = defenses.get(defense, seed=seed, **params)
    torch.manual_seed(seed)
    model = hooks.prepare_model(zoo.get("resnet20", num_classes=data.num_classes, in_channels=data.in_channels))
    start = time.perf_counter()
    report = fit(model, data.x_train[train_idx], data.y_train[train_idx], epochs=epochs, lr=lr,
                 batch_size=batch_size, weight_decay=0.0, seed=seed, progress=False, hooks=hooks)
    seconds = time.perf_counter() - start
    return accuracy(model, data.x_train[val_idx], data.y_train[val_idx]), report, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--size", type=int, default=32, help="digits image size (16 is 4x cheaper)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--clip", type=float, nargs="+", default=[1.0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--validation", type=float, default=0.2, help="fraction of the training split held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also train the winner's recipe without DP")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and alpha-range notes, once per candidate

    data = datasets.get("digits", size=args.size)
    train_idx, val_idx = validation_split(data.y_train, args.validation, args.seed)
    print(f"digits {args.size}x{args.size}: {len(train_idx)} tuning-train, {len(val_idx)} validation images; "
          f"epsilon {args.epsilon}, delta {args.delta}", flush=True)
    rows = []
    for batch_size, lr, clip, epochs in itertools.product(args.batch_size, args.lr, args.clip, args.epochs):
        params = {"epsilon": args.epsilon, "delta": args.delta, "max_grad_norm": clip}
        acc, report, seconds = run(data, train_idx, val_idx, "dp_sgd", params, batch_size, lr, epochs, args.seed)
        rows.append({"batch_size": batch_size, "lr": lr, "max_grad_norm": clip, "epochs": epochs,
                     "val_accuracy": acc, "epsilon_spent": report["epsilon_spent"],
                     "noise_multiplier": report["noise_multiplier"], "steps": report["steps"], "seconds": seconds})
        print(pd.DataFrame([rows[-1]]).to_string(index=False, header=len(rows) == 1, float_format="%.4g"), flush=True)
    table = pd.DataFrame(rows)
    best = table.loc[table["val_accuracy"].idxmax()]
    chosen = {"batch_size": int(best["batch_size"]), "lr": float(best["lr"]),
              "max_grad_norm": float(best["max_grad_norm"]), "epochs": int(best["epochs"])}
    print(f"\nchosen (best validation accuracy {best['val_accuracy']:.4f} at epsilon {best['epsilon_spent']:.4g}): "
          f"{chosen}")
    if args.baseline:
        acc, _, seconds = run(data, train_idx, val_idx, "groupnorm_baseline", {}, chosen["batch_size"],
                              chosen["lr"], chosen["epochs"], args.seed)
        print(f"groupnorm_baseline with the same recipe (no DP): validation accuracy {acc:.4f} ({seconds:.0f} s)")
        acc, _, seconds = run(data, train_idx, val_idx, "groupnorm_baseline", {}, *PLAIN_RECIPE, args.seed)
        print(f"groupnorm_baseline with the plain recipe (batch size, lr, epochs) = {PLAIN_RECIPE}: "
              f"validation accuracy {acc:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
