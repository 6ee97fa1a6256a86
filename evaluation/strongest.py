"""The strongest attacker per cell: for each (dataset, model, cut, defense, seed, images), every attacker that ran
on the same defended features, and per image the most leakage any of them reached.

A defense is only as good as the strongest attack it was tested against (Aerni, Zhang & Tramèr, CCS 2024), and
no single attacker is strongest everywhere: rMLE leads undefended, the learned decoder under noise, adaptive PEEL
under sparsification. So beside the per-attacker rows, tables, heatmaps and curves get one ``strongest`` row per
group of cells that differ only in their attack. Its per-image value is, per metric, the best over the attackers
on that image (the highest PSNR, SSIM or attack accuracy; the lowest MSE, LPIPS or KNN distance), so it is at
least as strong as each attacker on every image. Its mean and BCa interval are computed over those per-image
values like any cell's (``evaluation.statistics.summarize``), and ``strongest_by`` says which attacker won how
many images on PSNR (``strongest_winner``: the one that won most). Choosing the best attacker per image with the
truth is the evaluator's privilege: it bounds what the tested attackers reach together, not what one attacker
could pick without the truth.

A group gets a row when at least two of its cells are done and current, on the same number of images.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from leakbench.evaluation.metrics import IMAGE_METRICS, summarize, worst_case
from leakbench.evaluation.store import current_rows

#: The attack name of the strongest-attacker rows.
STRONGEST = "strongest"
#: The metric that names the winning attacker of each image.
WINNER_METRIC = "psnr"

__all__ = ["STRONGEST", "group_key", "strongest_rows", "with_strongest"]


def group_key(config_json: str) -> str:
    """The key of a cell's group: its config without the attack (cells with equal keys attacked the same images
    behind the same defended features)."""
    config = {k: v for k, v in json.loads(config_json).items() if k != "attack"}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _leakiest(values: np.ndarray, higher_leaks: bool) -> np.ndarray:
    """``values`` (attackers x images) with NaN as the least leakage, oriented so that larger leaks more."""
    oriented = values if higher_leaks else -values
    return np.where(np.isnan(oriented), -np.inf, oriented)


def _best(values: np.ndarray, higher_leaks: bool) -> np.ndarray:
    """Per image (columns) the most leakage over attackers (rows), ignoring NaN; NaN where every one is NaN."""
    best = _leakiest(values, higher_leaks).max(axis=0)
    best = np.where(np.isinf(best), np.nan, best)
    return best if higher_leaks else -best


def strongest_rows(cells: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(cells, images)`` of the strongest-attacker rows of the current cells in ``cells`` (frames shaped like
    ``ResultStore.cells()`` and ``ResultStore.images()``); both empty when no group has two attackers."""
    from leakbench.evaluation.tables import variant_labels  # tables imports this module

    current = current_rows(cells)
    if current.empty or images.empty:
        return pd.DataFrame(), pd.DataFrame()
    # the labels the tables give the attacks, so a winner reads as its column does
    current = current.assign(attack_label=variant_labels(current, "attack", "attack_params"))
    done = current[(current["status"] == "done") & current["config_json"].notna()]
    per_image = {key: frame.sort_values("image_index") for key, frame in images.groupby("cell_key")}
    metrics = [m for m in IMAGE_METRICS if m in images]
    rows, image_rows = [], []
    for group, members in done.groupby(done["config_json"].map(group_key), sort=False):
        members = members[members["cell_key"].isin(per_image)]
        counts = {len(per_image[k]) for k in members["cell_key"]}
        if len(members) < 2 or len(counts) != 1:
            continue
        labels = list(members["attack_label"])
        first = members.iloc[0]
        row: dict[str, Any] = {k: first[k] for k in members.columns if k in IDENTITY or k.startswith("dfil")}
        config = {**json.loads(first["config_json"]), "attack": {"name": STRONGEST, "params": {}}}
        row.update(cell_key=f"{STRONGEST}-{group}", attack=STRONGEST, attack_params="{}", status="done",
                   config_json=json.dumps(config, sort_keys=True),
                   is_current=True, strongest_of="; ".join(labels),
                   wall_time_s=float(members["wall_time_s"].sum()) if "wall_time_s" in members else math.nan)
        stacked = {m: np.stack([per_image[k][m].to_numpy(dtype=float) for k in members["cell_key"]])
                   for m in metrics}  # attackers x images
        best: dict[str, np.ndarray] = {}
        for metric in metrics:
            best[metric] = _best(stacked[metric], IMAGE_METRICS[metric])
            mean, low, high = summarize(best[metric].tolist(), seed=int(first["seed"]))
            row.update({metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        row.update(worst_case({m: v.tolist() for m, v in best.items()}))
        if WINNER_METRIC in best:
            scores = _leakiest(stacked[WINNER_METRIC], IMAGE_METRICS[WINNER_METRIC])
            winners = Counter(labels[i] for i in scores.argmax(axis=0))
            row["strongest_by"] = "; ".join(f"{name} {n}/{scores.shape[1]}" for name, n in winners.most_common())
            row["strongest_winner"] = winners.most_common(1)[0][0]
        rows.append(row)
        indices = per_image[members["cell_key"].iloc[0]]["image_index"].to_numpy()
        image_rows.append(pd.DataFrame({"cell_key": row["cell_key"], "image_index": indices, **best}))
    return pd.DataFrame(rows), (pd.concat(image_rows, ignore_index=True) if image_rows else pd.DataFrame())


#: The columns a strongest row copies from its group (everything but the attack's own), besides the dFIL bound
#: (``dfil*``: a property of the defended features, not of the attack).
IDENTITY = ("run_id", "dataset", "model", "cut", "defense", "defense_params", "seed", "accuracy", "guarantee_json",
            "config_json", "code_fingerprint", "evaluator")


def with_strongest(cells: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """``cells`` followed by their strongest-attacker rows (unchanged when there are none)."""
    extra, _ = strongest_rows(cells, images)
    return cells if extra.empty else pd.concat([cells, extra], ignore_index=True)
