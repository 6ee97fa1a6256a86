"""Figures, each saved as PNG and PDF: the reconstruction grid (originals over each cell's reconstructions),
privacy-utility curves, the defense x attack heatmap and PEEL's per-block error along the client's depth. Each
plots the current rows only (``evaluation.store.current_rows``): a figure never mixes code versions."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence, cast

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from leakbench import attacks  # noqa: E402
from leakbench.evaluation.metrics import IMAGE_METRICS  # noqa: E402
from leakbench.evaluation.store import current_rows  # noqa: E402
from leakbench.evaluation.strongest import STRONGEST  # noqa: E402
from leakbench.evaluation.tables import (ROW_GROUPS, distinguishing_params, matrix_table, missing_text,  # noqa: E402
                               variant_labels)

#: Axis titles of the metrics figures can plot.
METRIC_TITLES = {"psnr": "PSNR (dB), higher = more leakage", "attack_top1": "attack top-1 accuracy",
                 "attack_top5": "attack top-5 accuracy", "mse": "MSE", "ssim": "SSIM",
                 "knn_distance": "KNN distance", "lpips": "LPIPS"}


def _show(ax: plt.Axes, image: torch.Tensor) -> None:
    img = image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_grid(originals: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]], path: str | Path,
                        max_images: int = 8) -> Path:
    """Save a PNG: the originals in the first row, then one labelled row per reconstruction."""
    n = min(max_images, len(originals))
    all_rows = [("original", originals)] + list(rows)
    fig, axes = plt.subplots(len(all_rows), n, figsize=(1.1 * n + 3.2, 1.1 * len(all_rows)), squeeze=False)
    for r, (label, images) in enumerate(all_rows):
        for i in range(n):
            _show(axes[r][i], images[i])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.3, wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save(fig: plt.Figure, stem: str | Path, dpi: int = 110) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` and close the figure; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return paths


def _done(cells: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The done cells that carry ``metric`` (old stores may lack the newer metrics)."""
    if metric not in cells:
        return cells.iloc[0:0]
    return cells[(cells["status"] == "done") & cells[metric].notna() & cells["accuracy"].notna()]


#: dFIL PSNR bounds below this (an MSE bound above 1, vacuous for [0, 1] images) are not drawn.
DFIL_FLOOR_DB = 0.0


def privacy_utility(cells: pd.DataFrame, metric: str, stem: str | Path) -> list[Path]:
    """Accuracy against ``metric`` (e.g. psnr, attack_top1), one panel per attack, one line per defense over
    its strengths in config order, the metric's bootstrap 95% CI as horizontal error bars. Returns [] when no
    done cell has the metric. For PSNR, a dotted line of crosses in the same colour marks each noise defense's
    dFIL bound (the highest PSNR of an unbiased attacker's expected error; a biased one may pass it)."""
    cells = current_rows(cells)
    done = _done(cells, metric)
    if done.empty:
        return []
    done = done.assign(attack_label=variant_labels(done, "attack", "attack_params"))
    attacks = list(dict.fromkeys(done["attack_label"]))
    strengths = distinguishing_params(done, "defense", "defense_params")
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.0 * len(attacks), 4.2), squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        here = done[done["attack_label"] == attack]
        group = [k for k in ROW_GROUPS if k in cells and cells[k].nunique() > 1]
        for key, line in here.groupby(group + ["defense"], sort=False):
            low = (line[metric] - line.get(f"{metric}_ci_low", line[metric])).clip(lower=0).fillna(0)
            high = (line.get(f"{metric}_ci_high", line[metric]) - line[metric]).clip(lower=0).fillna(0)
            label = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            bars = ax.errorbar(line[metric], line["accuracy"], xerr=[low, high], marker="o", capsize=3, label=label)
            if metric == "psnr" and "dfil_psnr_bound" in line:  # the unbiased attacker's ceiling (evaluation.dfil)
                ceiling = line["dfil_psnr_bound"].where(np.isfinite(line["dfil_psnr_bound"]) &
                                                        (line["dfil_psnr_bound"] >= DFIL_FLOOR_DB))
                if ceiling.notna().any():
                    ax.plot(ceiling, line["accuracy"], linestyle=":", marker="x", color=bars.lines[0].get_color(),
                            label=f"{label}: dFIL bound (unbiased)")
            for x, y, strength in zip(line[metric], line["accuracy"], strengths[line.index]):
                if strength:  # only what varies along the line; the legend names the defense
                    ax.annotate(strength, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(attack)
        ax.set_xlabel(METRIC_TITLES.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (defended split model)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: never over points
    fig.suptitle(f"privacy-utility: accuracy against {metric}", fontsize=10)
    return save(fig, stem)


def leakage_heatmap(cells: pd.DataFrame, stem: str | Path, metric: str = "psnr") -> list[Path]:
    """The defense x attack matrix of ``metric`` as a heatmap (red = more leakage), each entry annotated;
    failed and not-applicable cells are grey with their status. Returns [] when the store lacks the metric."""
    if metric not in cells:
        return []
    table = matrix_table(cells, {metric: metric})
    columns = list(table.attrs["metrics"])
    rows = [" ".join(str(r[k]) for k in (*ROW_GROUPS, "defense", "strength") if k in table and str(r[k]))
            for _, r in table.iterrows()]
    values = table[columns].astype(float).to_numpy()
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 3, 0.5 * len(rows) + 1.5))
    cmap = plt.get_cmap("Reds" if IMAGE_METRICS.get(metric, True) else "Reds_r").with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    for i in range(len(rows)):
        for j, column in enumerate(columns):
            state = table.attrs["status"].get((i, column))
            text = f"{values[i, j]:.3g}" if not math.isnan(values[i, j]) else missing_text(state)
            # readable on dark red (a number in, a number out: Normalize's stubs say any array)
            dark = not math.isnan(values[i, j]) and cast(float, image.norm(values[i, j])) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), [c.removesuffix(f": {metric}") for c in columns], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    fig.colorbar(image, ax=ax, label=METRIC_TITLES.get(metric, metric))
    ax.set_title(f"{metric} per defense and attack")
    return save(fig, stem)


def leakage_by_depth(cells: pd.DataFrame, stem: str | Path, metric: str = "psnr") -> list[Path]:
    """Cut depth as a defense axis: per defense (and strength, and model), the leakage against the strongest
    attacker (``evaluation.strongest``; the highest mean where a cut has a single attacker) and the defended
    model's accuracy at each cut, cuts in config order. Returns [] unless the cells span two cuts or more."""
    done = _done(current_rows(cells), metric)
    if done.empty or done["cut"].nunique() < 2:
        return []
    cuts = list(dict.fromkeys(done["cut"]))
    strengths = distinguishing_params(done, "defense", "defense_params")
    done = done.assign(strength=strengths, is_strongest=done["attack"] == STRONGEST)
    higher = IMAGE_METRICS.get(metric, True)
    fig, (leak, utility) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    group = ["model"] if done["model"].nunique() > 1 else []
    for key, line in done.groupby(group + ["defense", "strength"], sort=False):
        points = []
        for cut, here in line.groupby("cut", sort=False):
            chosen = here[here["is_strongest"]] if here["is_strongest"].any() else here
            value = chosen[metric].max() if higher else chosen[metric].min()
            points.append((cuts.index(cut), value, float(here["accuracy"].iloc[0])))
        points.sort()
        label = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)) if str(k))
        xs = [p[0] for p in points]
        leak.plot(xs, [p[1] for p in points], marker="o", label=label)
        utility.plot(xs, [p[2] for p in points], marker="o", label=label)
    for ax, title in ((leak, f"{METRIC_TITLES.get(metric, metric)}, strongest attacker"),
                      (utility, "accuracy (defended split model)")):
        ax.set_xticks(range(len(cuts)), cuts, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("cut (input side first)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    utility.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("leakage and accuracy against the depth of the cut", fontsize=10)
    return save(fig, stem)


def _reports_block_errors(attack: str) -> bool:
    """Whether the attack registered as ``attack`` declares per-block errors (``Attack.reports_block_errors``)."""
    return attack in attacks.names() and attacks.attack_class(attack).reports_block_errors


def peel_depth_profile(cells: pd.DataFrame, stem: str | Path) -> list[Path]:
    """PEEL's relative error of each block's recovered input along the client, input to cut, one line per PEEL
    cell: ``diagnostics.attack.true_input_errors``, which the runner computes from the true images after the
    attack. Returns [] when no PEEL cell carries it."""
    cells = current_rows(cells)
    lines = []
    several_models = "model" in cells and cells["model"].nunique() > 1
    peel = cells[cells["attack"].map(_reports_block_errors).astype(bool) & (cells["status"] == "done")]
    variants = variant_labels(peel, "attack", "attack_params")  # e.g. the paper solver beside the default one
    strengths = distinguishing_params(peel, "defense", "defense_params")
    for i, c in peel.iterrows():
        attack = json.loads(c["diagnostics_json"] or "{}").get("attack", {})
        stages, errors = attack.get("stages", []), attack.get("true_input_errors", [])
        if errors and len(errors) == len(stages):
            model = f"{c['model']} " if several_models else ""
            label = f"{model}{c['cut']} {c['defense']} {strengths[i]} {variants[i]}".replace("  ", " ").strip()
            lines.append((label, [s.get("stage", str(j)) for j, s in enumerate(stages)], errors))
    if not lines:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for label, names, errors in lines:
        ax.plot(range(len(errors)), errors, marker="o", label=label)
    names = max((n for _, n, _ in lines), key=len)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("block (input side to the cut)")
    ax.set_ylabel("relative error of the block's recovered input")
    ax.set_title("PEEL: error along the depth of the client", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: never over the lines
    return save(fig, stem)
