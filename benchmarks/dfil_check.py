"""Do the measured attacks stay above the dFIL bound? Per noise-defense cell of a store: the bound on an unbiased
attacker's MSE (and its PSNR), the attack's mean MSE and PSNR, and how many images went below the bound.

    .venv/bin/python benchmarks/dfil_check.py results/dfil

The bound holds for unbiased attackers only; PEEL and rMLE are biased (a TV prior, the [0, 1] box), so images
below it break no theorem: they show how much the prior buys. Prints numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from leakbench.evaluation.export import current_results
from leakbench.evaluation.tables import strength_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results directory or its results.sqlite")
    args = parser.parse_args()
    cells, images = current_results(args.results)
    cells = cells[cells["status"] == "done"].assign(strength=lambda c: strength_labels(c))
    rows = []
    for _, c in cells.iterrows():
        mine = images[images["cell_key"] == c["cell_key"]]
        if "dfil_mse_bound" not in mine or not (mine["dfil_mse_bound"] > 0).any():  # 0: unbounded (no noise)
            continue
        bound = mine["dfil_mse_bound"].to_numpy(dtype=float)
        rows.append({"defense": f"{c['defense']} {c['strength']}".strip(), "attack": c["attack"],
                     "bound MSE": float(np.mean(bound)), "bound PSNR": -10 * math.log10(float(np.mean(bound))),
                     "MSE": float(mine["mse"].mean()), "PSNR": float(mine["psnr"].mean()),
                     "below bound": f"{int((mine['mse'].to_numpy() < bound).sum())}/{len(mine)}"})
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
