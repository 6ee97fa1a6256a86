"""Write what a run leaves behind: the Markdown and LaTeX tables, and the figures (PNG and PDF), all of the
current rows only, with the number of stale rows the store holds."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd
import torch

from leakbench.evaluation import figures
from leakbench.evaluation.config import Cell
from leakbench.evaluation.image_sets import attacked_indices
from leakbench.evaluation.store import ResultStore, current_rows, stale_line
from leakbench.evaluation.strongest import with_strongest
from leakbench.evaluation.tables import compact_summary, matrix_latex, to_markdown
from leakbench.splitnn import datasets
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.faults import writing

if TYPE_CHECKING:
    from leakbench.evaluation.runner import Matrix


@dataclass
class Grid:
    """One dataset's original test images (None when they could not be loaded: ``problem`` says why) and the
    (label, reconstructed images) of each of its cells."""

    dataset: str
    originals: torch.Tensor | None
    rows: list[tuple[str, torch.Tensor]]
    problem: str | None = None


@dataclass
class Outputs:
    """What ``write_outputs`` wrote (name -> path) and the texts ``leakbench run`` prints: the compact summary
    and the line saying how many stale rows the store holds."""

    paths: dict[str, str]
    summary: str
    stale: str


def _load_dataset(config: dict[str, Any]) -> Dataset:
    return datasets.get(config["dataset"]["name"], **config["dataset"]["params"])


def reconstruction_grids(store: ResultStore, cells: pd.DataFrame,
                         load: Callable[[dict[str, Any]], Dataset] = _load_dataset) -> list[Grid]:
    """One Grid per dataset among the cells that have their reconstructions stored, from the cells of its
    lowest seed and most common image count (cells of one seed attack the same drawn test images, see
    ``evaluation.image_sets``); ``load(cell config)`` gives the cell's dataset (the Matrix passes its cache)."""
    groups: dict[str, dict[tuple[int, int], list[tuple[dict[str, Any], str]]]] = {}
    for key, text in zip(cells["cell_key"], cells["config_json"]):
        config = json.loads(text)
        draw = (config["seed"], config["evaluation"]["num_images"])
        groups.setdefault(json.dumps(config["dataset"], sort_keys=True), {}).setdefault(draw, []).append((config, key))
    grids = []
    for draws in groups.values():
        seed = min(s for s, _ in draws)
        members = max((m for (s, _), m in draws.items() if s == seed), key=len)
        rows = [(Cell(config).short_label(), images) for config, key in members
                if (images := store.reconstruction(key)) is not None]
        if not rows:
            continue
        config = members[0][0]
        try:
            data = load(config)
            originals = data.x_test[attacked_indices(data, seed, config["evaluation"]["num_images"])]
            problem = None
        except Exception as exc:  # an old or foreign config must not stop the other outputs
            originals, problem = None, f"the original images could not be loaded ({type(exc).__name__}: {exc})"
        grids.append(Grid(config["dataset"]["name"], originals, rows, problem))
    return grids


def write_text(path: Path, text: str) -> None:
    """Write a text output; a failure (e.g. a full disk) is a WriteFailure naming ``path``."""
    with writing(path):
        path.write_text(text)


def grid_name(grids: list[Grid], index: int) -> str:
    """``reconstructions`` for a single grid, else ``reconstructions_<i>_<dataset>``."""
    return "reconstructions" if len(grids) == 1 else f"reconstructions_{index + 1}_{grids[index].dataset}"


def write_figures(cells: pd.DataFrame, out: Path, grids: list[Grid] | None = None) -> dict[str, list[Path]]:
    """Every figure the data allow, as ``out/<name>.png`` and ``.pdf``; a figure whose data are missing (e.g.
    attack accuracy in a store written before the evaluation classifier) is left out of the result. Each
    figure's name is its file stem; the reconstruction grid is ``reconstructions``, or
    ``reconstructions_<i>_<dataset>`` per dataset when the cells use several."""
    plots: dict[str, Callable[[Path], list[Path]]] = {
        "privacy_utility_psnr": lambda stem: figures.privacy_utility(cells, "psnr", stem),
        "privacy_utility_attack_top1": lambda stem: figures.privacy_utility(cells, "attack_top1", stem),
        "heatmap_psnr": lambda stem: figures.leakage_heatmap(cells, stem),
        "peel_depth": lambda stem: figures.peel_depth_profile(cells, stem),
        "leakage_by_depth": lambda stem: figures.leakage_by_depth(cells, stem),
    }
    made = {name: plot(out / name) for name, plot in plots.items()}
    grids = grids or []
    for index, grid in enumerate(grids):
        if grid.originals is not None and grid.rows:
            stem = out / grid_name(grids, index)
            made[stem.name] = [figures.reconstruction_grid(grid.originals, grid.rows, stem.with_suffix(suffix))
                               for suffix in (".png", ".pdf")]
    return {name: paths for name, paths in made.items() if paths}


def write_outputs(store: ResultStore, matrix: "Matrix", out: Path) -> Outputs:
    """``table.md``, ``table.tex`` and the figures for the current cells of ``matrix``'s config."""
    cells = current_rows(store.cells([c.key for c in matrix.cells()]))
    stale = stale_line(store.cells())
    grids = reconstruction_grids(store, cells, lambda c: matrix.dataset(Cell(c)))
    frame = with_strongest(cells, store.images())  # after the grids: a strongest row has no images of its own
    write_text(out / "table.md", f"# {matrix.config.name}\n\n{to_markdown(frame)}\n\n{stale}\n")
    write_text(out / "table.tex", matrix_latex(frame) + "\n")
    paths = {"store": str(store.path), "table": str(out / "table.md"), "latex table": str(out / "table.tex")}
    with writing(out):
        made = write_figures(frame, out, grids)
    if "reconstructions" in made:
        paths["grid"] = str(made.pop("reconstructions")[0])
    paths.update({f"figure {name}": ", ".join(str(p) for p in found) for name, found in made.items()})
    return Outputs(paths, compact_summary(frame), stale)
