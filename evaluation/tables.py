"""The result table: one row per cell, utility and privacy side by side."""
from __future__ import annotations

import json

import pandas as pd

from evaluation.metrics import IMAGE_METRICS


def _params(text: str) -> str:
    params = json.loads(text) if text else {}
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _guarantee(text: str | None) -> str:
    """A defense's formal guarantee in one cell, e.g. ``ε=1, δ=1e-05``; empty when it has none."""
    g = json.loads(text) if text else {}
    parts = []
    if "epsilon" in g:
        parts.append(f"ε={g['epsilon']:.4g}")
    if g.get("delta"):
        parts.append(f"δ={g['delta']:.3g}")
    return ", ".join(parts)


def result_table(cells: pd.DataFrame) -> pd.DataFrame:
    """A readable frame of the cells: identity, status, accuracy, guarantee, and each privacy metric with its
    95% CI."""
    rows = []
    for _, c in cells.iterrows():
        row = {"cut": c["cut"], "defense": c["defense"], "defense params": _params(c["defense_params"]),
               "attack": c["attack"], "seed": c["seed"], "status": c["status"],
               "accuracy": c.get("accuracy"), "guarantee": _guarantee(c.get("guarantee_json"))}
        for metric in IMAGE_METRICS:
            if metric in c and pd.notna(c[metric]):
                row[metric] = c[metric]
                row[f"{metric} 95% CI"] = f"[{c[f'{metric}_ci_low']:.4g}, {c[f'{metric}_ci_high']:.4g}]"
            else:
                row[metric] = None
        row["time (s)"] = c.get("wall_time_s")
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(cells: pd.DataFrame) -> str:
    """The result table as GitHub Markdown; failed and inapplicable cells keep their rows."""
    table = result_table(cells)
    return table.to_markdown(index=False, floatfmt=".4g")
