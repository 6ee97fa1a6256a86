"""Paired per-image comparison of two attacks (or settings) from the result store's frames.

"A beats B" is claimed only from pairs: the same image, model seed and defended features, attacked by A and by B.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, Callable, Mapping

import pandas as pd

from leakbench.evaluation.metrics import CELL_METRICS, IMAGE_METRICS
from leakbench.evaluation.statistics import PairedDifference, paired_difference

#: A comparison is made within each of these groups: everything about a cell except what tells A from B.
GROUP_COLUMNS = ["dataset", "model", "cut", "defense", "defense_params"]
#: One pair: an image of one seed's draw, within a group.
PAIR_COLUMNS = [*GROUP_COLUMNS, "seed", "image_index"]
RESULT_COLUMNS = [f.name for f in fields(PairedDifference)]

__all__ = ["GROUP_COLUMNS", "PAIR_COLUMNS", "RESULT_COLUMNS", "compare", "select"]

Selector = Mapping[str, Any]


def select(cells: pd.DataFrame, selector: Selector) -> pd.DataFrame:
    """The cells whose columns match ``selector``: a value is compared for equality, a callable is a predicate on
    the column's value, and a dict for a ``*_params`` column is compared with its parsed JSON."""
    mask = pd.Series(True, index=cells.index)
    for column, wanted in selector.items():
        if column not in cells.columns:
            raise KeyError(f"selector column {column!r} is not a cells column; expected one of {list(cells.columns)}")
        mask &= cells[column].map(_matcher(wanted)).astype(bool)
    return cells[mask]


def _matcher(wanted: Any) -> Callable[[Any], bool]:
    if callable(wanted):
        return wanted
    if isinstance(wanted, dict):
        return lambda value: (json.loads(value) if isinstance(value, str) else value) == wanted
    return lambda value: value == wanted


def compare(images: pd.DataFrame, cells: pd.DataFrame, a: Selector, b: Selector, metric: str,
            confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (dataset, model, cut, defense, defense_params) in which both ``a`` and ``b`` have done cells:
    the paired difference ``a - b`` of ``metric`` over (seed, image_index), with its BCa interval and verdict.

    ``leaks_more`` names the side whose metric shows more leakage (direction from ``IMAGE_METRICS``) when the
    interval excludes zero. Only ``done`` cells count; pass the current (same-fingerprint) cells only.
    """
    if metric not in images.columns:
        raise KeyError(f"metric {metric!r} is not an images column; expected one of {list(images.columns)}")
    done = cells[cells["status"] == "done"]
    side_a, side_b = select(done, a), select(done, b)
    both = sorted(set(side_a.cell_key) & set(side_b.cell_key))
    if both:
        raise ValueError(f"cells {both} match both a={dict(a)} and b={dict(b)}; make the selectors disjoint")
    per_image = images[["cell_key", "image_index", metric]]
    paired = pd.merge(_pairs(side_a, per_image, a), _pairs(side_b, per_image, b), on=PAIR_COLUMNS,
                      suffixes=("_a", "_b"), validate="one_to_one")
    higher_leaks = {**IMAGE_METRICS, **CELL_METRICS}.get(metric)
    rows = []
    for group, frame in paired.groupby(GROUP_COLUMNS, sort=True, dropna=False):
        frame = frame.sort_values(["seed", "image_index"])
        result = paired_difference(frame[f"{metric}_a"], frame[f"{metric}_b"], confidence=confidence, seed=seed,
                                   seeds=frame["seed"])
        rows.append({**dict(zip(GROUP_COLUMNS, group)), **asdict(result),
                     "leaks_more": _leaks_more(result, higher_leaks)})
    return pd.DataFrame(rows, columns=[*GROUP_COLUMNS, *RESULT_COLUMNS, "leaks_more"])


def _pairs(side: pd.DataFrame, per_image: pd.DataFrame, selector: Selector) -> pd.DataFrame:
    """The side's per-image values keyed by pair; two cells of one side in one pair make the pairing ambiguous."""
    frame = side[["cell_key", *PAIR_COLUMNS[:-1]]].merge(per_image, on="cell_key").drop(columns="cell_key")
    clash = frame.duplicated(PAIR_COLUMNS, keep=False)
    if clash.any():
        groups = frame.loc[clash, PAIR_COLUMNS[:-1]].drop_duplicates().to_dict("records")
        raise ValueError(f"selector {dict(selector)} matches several cells for one seed of {groups}; narrow it "
                         f"(e.g. add attack_params)")
    return frame


def _leaks_more(result: PairedDifference, higher_leaks: bool | None) -> str:
    if higher_leaks is None or result.verdict not in ("a > b", "a < b"):
        return ""
    return "a" if (result.verdict == "a > b") == higher_leaks else "b"
