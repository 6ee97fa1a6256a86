"""``leakbench export``: the cells table (one row per cell) and the images table (one row per image,
with its cell's identity columns) as CSV or Parquet, for analysis outside leakbench. Every row carries its
``code_fingerprint`` and ``is_current`` (computed by the installed code, see ``evaluation.store``): filter on
``is_current`` before comparing rows, since stale ones came from other code."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from leakbench.evaluation.store import IDENTITY_COLUMNS, ResultStore, current_rows
from leakbench.splitnn.faults import writing

FORMATS = ("csv", "parquet")


def find_store(path: str | Path) -> Path:
    """A results directory (``leakbench run --out DIR``) or the SQLite file itself -> the SQLite file."""
    path = Path(path)
    candidate = path / "results.sqlite" if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(2, "no result store (results.sqlite) there", str(candidate))
    return candidate


def current_results(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the current cells, every image row) of the store at ``path`` (``find_store``), opened read-only: what the
    benchmark scripts that read a results directory start from. Stale cells (other code) are left out."""
    with ResultStore(find_store(path), read_only=True) as store:
        return current_rows(store.cells()), store.images()


def export(source: str | Path, fmt: str = "csv", out: str | Path | None = None) -> dict[str, Path]:
    """Write ``<out>.<fmt>`` (cells) and ``<out>_images.<fmt>`` (per-image rows); ``out`` defaults to
    ``cells`` beside the store. Returns the two paths. Parquet needs pyarrow."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise RuntimeError("Parquet export needs pyarrow: pip install pyarrow (or use --format csv)") from None
    db = find_store(source)
    base = Path(out) if out is not None else db.parent / "cells"
    if base.suffix == f".{fmt}":
        base = base.with_suffix("")
    with writing(base.parent):
        base.parent.mkdir(parents=True, exist_ok=True)
    with ResultStore(db, read_only=True) as store:  # never creates or changes the store
        cells = store.cells()
        images = store.images().merge(cells[["cell_key", "status", "code_fingerprint", "is_current",
                                             *IDENTITY_COLUMNS]], on="cell_key", how="left")
    paths = {"cells": base.with_name(base.name + f".{fmt}"), "images": base.with_name(base.name + f"_images.{fmt}")}
    for name, frame in (("cells", cells), ("images", images)):
        with writing(paths[name]):
            if fmt == "csv":
                frame.to_csv(paths[name], index=False)
            else:
                frame.to_parquet(paths[name], index=False)
    return paths
