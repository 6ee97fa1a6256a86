"""The defense × attacker table of the READMEs: per defense and strength (and cut, in a sweep of cuts), its
accuracy, each attacker's mean PSNR (the highest in bold), the strongest attacker per image (with who won how
many images), the share of the strongest attacker's reconstructions the evaluation classifier recognises, and
the dFIL PSNR bound.

    .venv/bin/python benchmarks/strongest_table.py results/attacks

Prints numbers; asserts nothing. The strongest row is ``evaluation.strongest``'s, from the current rows only.
"""
from __future__ import annotations

import argparse
import math

import pandas as pd

from leakbench.evaluation.export import current_results
from leakbench.evaluation.strongest import STRONGEST, strongest_rows
from leakbench.evaluation.tables import strength_labels, variant_labels


def _number(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results directory or its results.sqlite")
    args = parser.parse_args()
    cells, images = current_results(args.results)
    strongest, _ = strongest_rows(cells, images)
    cells = cells[cells["status"] == "done"]
    cells = cells.assign(attack_label=variant_labels(cells, "attack", "attack_params"))
    everything = pd.concat([cells, strongest.assign(attack_label=STRONGEST)], ignore_index=True)
    everything = everything.assign(strength=strength_labels(everything))
    attackers = list(dict.fromkeys(cells["attack_label"]))
    by_cut = everything["cut"].nunique() > 1  # a depth sweep: one row per cut and defense
    lines = [("| cut " if by_cut else "") + "| defense (accuracy) | " + " | ".join(attackers)
             + " | strongest (won by, images) | recognised | dFIL PSNR bound |",
             "|---" * (len(attackers) + 4 + by_cut) + "|"]
    keys = (["cut"] if by_cut else []) + ["defense", "strength"]
    for key, rows in everything.groupby(keys, sort=False):
        defense, strength = key[-2:]
        per = {r["attack_label"]: r for _, r in rows.iterrows()}
        best = max((per[a]["psnr"] for a in attackers if a in per), default=math.nan)
        values = [(f"**{_number(per[a]['psnr'])}**" if per[a]["psnr"] == best else _number(per[a]["psnr"]))
                  if a in per else "n/a" for a in attackers]
        top = per.get(STRONGEST)
        first = rows.iloc[0]
        bound = first.get("dfil_psnr_bound", math.nan)
        bound_text = ("unbounded (no noise)" if isinstance(bound, float) and math.isinf(bound)
                      else _number(bound))
        label = f"{defense} {strength}".strip()
        lines.append((f"| {key[0]} " if by_cut else "") + f"| {label} ({first['accuracy']:.3f}) | "
                     + " | ".join(values) + " | "
                     + (f"{_number(top['psnr'])} ({top['strongest_by']})" if top is not None else "n/a") + " | "
                     + (_number(top.get("recognised", math.nan)) if top is not None else "n/a") + " | "
                     + bound_text + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
