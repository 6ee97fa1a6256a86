"""Tune DP-SGD for utility at a fixed privacy budget on a held-out validation split, as the DP literature does
(De et al. 2022; an untuned DP baseline is the straw man Aerni et al. 2024 warn about).

The digits training split is cut (stratified, seeded) into a tuning-train part and a validation part; the test
split is never read. Every candidate trains ResNet-20 with the one training loop (``splitnn.training.fit``: SGD
with momentum, cosine schedule) hooked by ``dp_sgd`` at the target epsilon (Opacus, Poisson sampling with the
candidate's expected batch size), so each candidate spends the same budget; the best validation accuracy wins.
The candidate is given as ``dp_sgd``'s own recipe parameters (epochs, lr, batch_size, weight_decay) over the
plain plan, the path an experiment's DP-SGD row takes. With ``--baseline`` the same GroupNorm model and loop
are also trained without DP (``groupnorm_baseline``), with the winner's recipe and with the plain recipe of
experiments/defenses.yaml. Prints one row per candidate, the chosen recipe and the YAML entry of its row.
A small grid at 16x16 (about 8 min on 2 cores):

    .venv/bin/python benchmarks/tune_dp_sgd.py --size 16 --batch-size 128 512 --lr 0.5 2.0 --clip 1.0 \\
        --epochs 10 25 --baseline

chose batch 128, lr 2.0, 25 epochs, clip 1.0, weight decay 0: validation accuracy 0.829 (0.993 for
groupnorm_baseline with the plain recipe, then run without weight decay). At the experiments' size (digits
32x32, the default) only the choice is checked (5 min 30 s on 2 cores):

    .venv/bin/python benchmarks/tune_dp_sgd.py --batch-size 128 --lr 2.0 --epochs 25 --baseline

validation accuracy 0.851 (epsilon 7.995, noise multiplier 1.33, 225 steps); groupnorm_baseline 0.372 with that
recipe and 0.981 with the plain one. The weight decay is part of the recipe: 0.781 with the plain 5e-4
(``--weight-decay 5e-4``). At epsilon 1 (``--epsilon 1``) nothing tried learns much: 0.138 with this recipe,
0.175 with 10 epochs, 0.171 with batch 512 and 10 epochs (chance is 0.10).

Augmentation multiplicity (De et al.) is not tried: the loop has no augmentation yet.
"""
from __future__ import annotations

import argparse
import itertools
import time
import warnings
from dataclasses import asdict
from typing import Any

import pandas as pd
import torch
import yaml

from leakbench import defenses
from leakbench.splitnn import datasets, zoo
from leakbench.splitnn.hooks import Recipe
from leakbench.splitnn.training import accuracy, fit


#: The non-private recipe of experiments/defenses.yaml (the train section; weight decay the TrainConfig default):
#: an lr tuned for clipped DP gradients is far too large without clipping.
PLAIN_RECIPE = Recipe(epochs=10, lr=0.05, batch_size=64, weight_decay=5e-4)


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


def run(data: datasets.Dataset, train_idx: torch.Tensor, val_idx: torch.Tensor, defense: str,
        params: dict[str, Any], plan: Recipe, seed: int) -> tuple[float, dict[str, Any], float]:
    """Validation accuracy, the defense's report and the seconds of one training under ``defense``, planned
    with ``plan`` (a defense's own recipe parameters override it, as in an experiment)."""
    hooks = defenses.get(defense, seed=seed, **params)
    torch.manual_seed(seed)
    model = hooks.prepare_model(zoo.get("resnet20", num_classes=data.num_classes, in_channels=data.in_channels))
    start = time.perf_counter()
    report = fit(model, data.x_train[train_idx], data.y_train[train_idx], epochs=plan.epochs, lr=plan.lr,
                 batch_size=plan.batch_size, weight_decay=plan.weight_decay, seed=seed, progress=False, hooks=hooks)
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
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[0.0])
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
    for batch_size, lr, clip, epochs, decay in itertools.product(args.batch_size, args.lr, args.clip, args.epochs,
                                                                 args.weight_decay):
        params = {"epsilon": args.epsilon, "delta": args.delta, "max_grad_norm": clip, "epochs": epochs, "lr": lr,
                  "batch_size": batch_size, "weight_decay": decay}
        acc, report, seconds = run(data, train_idx, val_idx, "dp_sgd", params, PLAIN_RECIPE, args.seed)
        rows.append({**params, "val_accuracy": acc, "epsilon_spent": report["epsilon_spent"],
                     "noise_multiplier": report["noise_multiplier"], "steps": report["steps"], "seconds": seconds})
        print(pd.DataFrame([rows[-1]]).drop(columns=["epsilon", "delta"]).to_string(
            index=False, header=len(rows) == 1, float_format="%.4g"), flush=True)
    best = max(rows, key=lambda row: row["val_accuracy"])
    chosen = {name: best[name] for name in params}
    print(f"\nchosen (best validation accuracy {best['val_accuracy']:.4f} at epsilon {best['epsilon_spent']:.4g}): "
          f"{chosen}")
    entry = yaml.safe_dump({"name": "dp_sgd", "params": chosen}, default_flow_style=True, sort_keys=False,
                           width=1000).strip()
    print(f"YAML entry (defenses:):\n  # benchmarks/tune_dp_sgd.py: validation accuracy {best['val_accuracy']:.3f} "
          f"(digits {args.size}x{args.size}, epsilon {args.epsilon:g})\n  - {entry}")
    if args.baseline:
        recipe = Recipe(epochs=chosen["epochs"], lr=chosen["lr"], batch_size=chosen["batch_size"],
                        weight_decay=chosen["weight_decay"])
        acc, _, seconds = run(data, train_idx, val_idx, "groupnorm_baseline", {}, recipe, args.seed)
        print(f"groupnorm_baseline with the same recipe (no DP): validation accuracy {acc:.4f} ({seconds:.0f} s)")
        acc, _, seconds = run(data, train_idx, val_idx, "groupnorm_baseline", {}, PLAIN_RECIPE, args.seed)
        print(f"groupnorm_baseline with the plain recipe {asdict(PLAIN_RECIPE)}: "
              f"validation accuracy {acc:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
