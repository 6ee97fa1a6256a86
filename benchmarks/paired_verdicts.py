"""Paired per-image verdicts between attack variants of a result store: "A beats B" only from pairs.

Each variant is ``NAME`` or ``NAME:key=value,key=value`` (the attack's name and a subset of its stored
parameters, values read as YAML). For every (dataset, model, cut, defense) where both have current done
cells, prints the mean paired difference A - B over (seed, image) pairs with its BCa 95% CI and the verdict,
beside each side's mean and worst case. Run, e.g.:

    .venv/bin/python benchmarks/paired_verdicts.py results/paper/peel_vs_rmle_small \
        --a peel --b rmle:loss=plain --b rmle:loss=relu_consistency --metric psnr

With ``--best``, one more table: per (model, cut, defense), A against whichever B leaked most there (the
highest mean; the lowest for a metric where lower leaks more), named in ``best_b``: is A at least as strong as
the best single one of them?
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import pandas as pd
import yaml

from leakbench.evaluation.compare import compare
from leakbench.evaluation.metrics import IMAGE_METRICS
from leakbench.evaluation.export import current_results


def variant(text: str) -> dict[str, Any]:
    """``NAME[:k=v,...]`` -> a selector on the attack's name and a subset of its parameters."""
    name, _, rest = text.partition(":")
    wanted = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in rest.split(",") if item)}

    def matches(params: str) -> bool:
        stored = json.loads(params)
        return all(stored.get(k) == v for k, v in wanted.items())
    return {"attack": name, "attack_params": matches}


#: Cell columns ``sides`` averages over seeds (absent ones are left out).
SIDE_COLUMNS = ("psnr_p95", "recognised", "budget_end_to_end_evaluations", "budget_blockwise_evaluations",
                "wall_time_s")


def sides(cells: pd.DataFrame, variants: list[str], metric: str) -> pd.DataFrame:
    """One row per (variant, model, cut): the seeds' mean of ``metric`` and of ``SIDE_COLUMNS``."""
    done = cells[cells["status"] == "done"]
    rows = []
    for text in variants:
        selector = variant(text)
        chosen = done[(done["attack"] == selector["attack"]) & done["attack_params"].map(selector["attack_params"])]
        for (model, cut), group in chosen.groupby(["model", "cut"], sort=False):
            row = {"variant": text, "model": model, "cut": cut, "seeds": group["seed"].nunique(),
                   metric: group[metric].mean()}
            row.update({c: group[c].mean() for c in SIDE_COLUMNS if c in group})
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results directory or its results.sqlite")
    parser.add_argument("--a", required=True, help="variant A, NAME[:key=value,...]")
    parser.add_argument("--b", required=True, action="append", help="variant B (repeatable)")
    parser.add_argument("--metric", default="psnr")
    parser.add_argument("--best", action="store_true", help="also A against the best B of each cell group")
    args = parser.parse_args()
    cells, images = current_results(args.results)
    print(f"Per variant: means over seeds of each cell's mean {args.metric}, worst case (PSNR p95, share "
          f"recognised), end-to-end and block-wise evaluations per image, and wall time per cell (s)\n")
    print(sides(cells, [args.a, *args.b], args.metric).to_markdown(index=False, floatfmt=".3g"))
    columns = ["model", "cut", "defense", "defense_params", "n_pairs", "n_seeds", "mean_a", "mean_b",
               "mean_difference", "low", "high", "verdict"]
    tables = []
    for b in args.b:
        table = compare(images, cells, variant(args.a), variant(b), args.metric)[columns]
        tables.append(table.assign(best_b=b))
        print(f"\nA = {args.a}, B = {b}: {args.metric}, A - B over paired (seed, image)\n")
        print(table.drop(columns="defense_params").to_markdown(index=False, floatfmt=".3g"))
    if args.best:
        print(f"\nA = {args.a} against the best B of each group: {args.metric}, A - B over paired (seed, image)\n")
        print(best_of(pd.concat(tables), higher_leaks=IMAGE_METRICS.get(args.metric, True)).to_markdown(
            index=False, floatfmt=".3g"))


def best_of(tables: pd.DataFrame, higher_leaks: bool = True) -> pd.DataFrame:
    """Per (model, cut, defense, defense_params), the row of the B with the most leakage (its mean)."""
    order = tables.sort_values("mean_b", ascending=not higher_leaks, kind="stable")
    best = order.drop_duplicates(["model", "cut", "defense", "defense_params"], keep="first")
    return best.sort_values(["model", "cut", "defense", "defense_params"])[
        ["model", "cut", "defense", "defense_params", "best_b", "n_pairs", "mean_a", "mean_b", "mean_difference",
         "low", "high", "verdict"]]


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    main()
