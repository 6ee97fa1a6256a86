"""Write what a run leaves behind: the Markdown and LaTeX tables, and the figures (PNG and PDF)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from evaluation import figures
from evaluation.config import Cell
from evaluation.store import ResultStore
from evaluation.tables import matrix_latex, to_markdown

if TYPE_CHECKING:
    from evaluation.runner import Matrix

#: The figures every run and report writes (when their data exist), by name -> file stem.
FIGURES = {"privacy_utility_psnr": "privacy_utility_psnr", "privacy_utility_attack_top1":
           "privacy_utility_attack_top1", "heatmap_psnr": "heatmap_psnr", "peel_depth": "peel_depth",
           "reconstructions": "reconstructions"}


def reconstruction_rows(store: ResultStore, cells: pd.DataFrame) -> list[tuple[str, torch.Tensor]]:
    """(label, reconstructed images) of every cell of ``cells`` that has its reconstructions stored."""
    rows = []
    for key, config in zip(cells["cell_key"], cells["config_json"]):
        images = store.reconstruction(key)
        if images is not None:
            rows.append((Cell(json.loads(config)).short_label(), images))
    return rows


def write_figures(cells: pd.DataFrame, out: Path, originals: torch.Tensor | None = None,
                  rows: list[tuple[str, torch.Tensor]] | None = None) -> dict[str, list[Path]]:
    """Every figure the data allow, as ``out/<name>.png`` and ``.pdf``; a figure whose data are missing (e.g.
    attack accuracy in a store written before the evaluation classifier) is left out of the result."""
    made = {
        "privacy_utility_psnr": figures.privacy_utility(cells, "psnr", out / FIGURES["privacy_utility_psnr"]),
        "privacy_utility_attack_top1": figures.privacy_utility(cells, "attack_top1",
                                                               out / FIGURES["privacy_utility_attack_top1"]),
        "heatmap_psnr": figures.leakage_heatmap(cells, out / FIGURES["heatmap_psnr"]),
        "peel_depth": figures.peel_depth_profile(cells, out / FIGURES["peel_depth"]),
    }
    if originals is not None and rows:
        stem = out / FIGURES["reconstructions"]
        made["reconstructions"] = [figures.reconstruction_grid(originals, rows, stem.with_suffix(suffix))
                                   for suffix in (".png", ".pdf")]
    return {name: paths for name, paths in made.items() if paths}


def write_outputs(store: ResultStore, matrix: "Matrix", out: Path) -> dict[str, str]:
    """``table.md``, ``table.tex`` and the figures for the cells of ``matrix``'s config."""
    cells = matrix.cells()
    frame = store.cells([c.key for c in cells])
    text = to_markdown(frame)
    (out / "table.md").write_text(f"# {matrix.config.name}\n\n{text}\n")
    (out / "table.tex").write_text(matrix_latex(frame) + "\n")
    paths = {"table_text": text, "store": str(store.path), "table": str(out / "table.md"),
             "latex table": str(out / "table.tex")}
    originals = matrix.dataset(cells[0]).x_test[:cells[0]["evaluation"]["num_images"]]
    made = write_figures(frame, out, originals, reconstruction_rows(store, frame))
    if "reconstructions" in made:
        paths["grid"] = str(made.pop("reconstructions")[0])
    paths.update({f"figure {name}": ", ".join(str(p) for p in found) for name, found in made.items()})
    return paths
