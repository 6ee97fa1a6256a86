"""The result store: SQLite, one row per cell and one per image, each cell written in one transaction.

Schema:
- ``runs(run_id, started_at, finished_at, config_json, provenance_json)``: one row per invocation.
- ``cells(cell_key, run_id, status, reason, <identity columns>, accuracy, <metric>, <metric>_ci_low,
  <metric>_ci_high, ..., guarantee_json, diagnostics_json, wall_time_s, peak_rss_mb, config_json,
  finished_at, code_fingerprint, <extra>...)``: one row per cell, keyed by the hash of its full config.
  ``status`` is ``done``, ``failed`` (``reason`` holds the error) or ``not_applicable`` (``reason`` says why).
  ``code_fingerprint`` is the fingerprint of the code that computed the row (``row_fingerprint``): a row is
  *current* when it equals what the installed code gives its config now, else *stale* (never shown as
  current). Extra columns (e.g. budgets) are REAL for numbers and TEXT for strings.
- ``images(cell_key, image_index, <metric>...)``: per-image metrics of a done cell.
- ``reconstructions(cell_key, images)``: the reconstructed images (a compressed float16 array).
Metric and extra columns are added when they first appear, so they need no migration. The layout has a version
(``evaluation.store_schema``): an older store is migrated on a writable open, a newer or foreign one refused.
``read_only=True`` (report, export) opens with ``mode=ro``: it never creates, migrates or changes a store. A
failed write (e.g. a full disk) raises ``WriteFailure`` naming the store.
"""
from __future__ import annotations

import io
import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from leakbench import attacks, defenses
from leakbench.evaluation.store_schema import (IO_CODES, SCHEMA_VERSION, SQLITE_NOTADB, StoreVersionError, add_columns,
                                     columns, error_code, migrate, needs_migration, open_read_only, stored_version)
from leakbench.splitnn.faults import write_failure
from leakbench.splitnn.fingerprint import code_fingerprint
from leakbench.splitnn.user_models import factory_module

IDENTITY_COLUMNS = ["dataset", "model", "cut", "defense", "defense_params", "attack", "attack_params", "seed"]

#: The modules that compute a row besides its attack's and defense's: editing one makes every row stale.
ROW_MODULES = tuple(f"leakbench.{m}" for m in (
    "evaluation.runner", "evaluation.metrics", "evaluation.evaluators", "evaluation.eval_classifier",
    "evaluation.attack_context", "splitnn.training", "splitnn.split", "splitnn.datasets", "splitnn.zoo"))


def row_fingerprint(config: dict[str, Any]) -> str | None:
    """The fingerprint the installed code gives a cell config: its attack's and defense's modules and
    ``ROW_MODULES``, with their imports and the package versions, and the module of the user's factory when its
    model or evaluation classifier is one (``package.module:function``: editing it makes its rows stale; zoo and
    torchvision cells keep the fingerprint they had before). None when the attack or defense is no longer
    registered (its rows can only be stale)."""
    try:
        attack = attacks.attack_class(config["attack"]["name"])
        defense = defenses.defense_class(config["defense"]["name"])
    except (KeyError, TypeError, ValueError):
        return None
    return code_fingerprint(attack.__module__, defense.__module__, *ROW_MODULES, *user_modules(config))


def user_modules(config: dict[str, Any]) -> list[str]:
    """The modules of the user's factories a cell config names: its model's and its evaluation classifier's."""
    judge = config.get("evaluation", {}).get("classifier")
    names = [config.get("model", {}).get("name"), judge.get("name") if isinstance(judge, dict) else None]
    return [module for name in names if isinstance(name, str) and (module := factory_module(name)) is not None]


def mark_current(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with an ``is_current`` column: its stored ``code_fingerprint`` is what the installed code
    gives its config now."""
    stored = cells["code_fingerprint"] if "code_fingerprint" in cells else pd.Series(None, index=cells.index)
    now = [row_fingerprint(json.loads(text)) if isinstance(text, str) else None for text in cells["config_json"]]
    return cells.assign(is_current=[s is not None and s == n for s, n in zip(stored, now)])


def current_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """The current rows of ``cells`` (all of them when the frame does not say, e.g. a hand-made frame)."""
    return cells[cells["is_current"].astype(bool)] if "is_current" in cells else cells


def stale_line(cells: pd.DataFrame) -> str:
    """How many stale rows a frame of ``ResultStore.cells()`` holds, in one line for tables and summaries."""
    stale = int((~cells["is_current"].astype(bool)).sum()) if "is_current" in cells else 0
    if not stale:
        return "The store holds no stale rows: every row shown comes from the installed code."
    return (f"The store holds {stale} stale row{'s' if stale != 1 else ''} (other code or package versions), "
            f"not shown: rerun their config.")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def encode_images(images: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.detach().cpu().numpy().astype(np.float16))
    return buffer.getvalue()


def decode_images(blob: bytes) -> torch.Tensor:
    with np.load(io.BytesIO(blob)) as data:
        return torch.from_numpy(data["images"].astype(np.float32))


def params_text(params: dict[str, Any]) -> str:
    """Parameters as ``k=v, ...`` (empty for none)."""
    return ", ".join(f"{k}={v}" for k, v in params.items())


def named(part: dict[str, Any]) -> str:
    """A ``{name, params}`` entry as ``name(k=v, ...)``, or just ``name`` without parameters."""
    return f"{part['name']}({params_text(part['params'])})" if part["params"] else part["name"]


def model_label(config: dict[str, Any]) -> str:
    """The model column: its name, its parameters when any were given, and "untrained" for random weights."""
    return named(config["model"]) + (" untrained" if config.get("train", {}).get("epochs") == 0 else "")


class ResultStore:
    """SQLite store of runs, cells and per-image metrics; a finished cell is never recomputed."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise FileNotFoundError(2, "no result store there (run `leakbench run` first)", str(self.path))
        connection: sqlite3.Connection | None = None
        try:
            if read_only:
                connection = self.connection = open_read_only(self.path)
                self.version = stored_version(self.connection, self.path, empty_ok=False)
                return
            with self._writing():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = self.connection = sqlite3.connect(self.path, timeout=30)
                version = stored_version(self.connection, self.path, empty_ok=True)  # before changing anything
                self.connection.execute("PRAGMA journal_mode=WAL")
                if needs_migration(self.connection, version):
                    with self.transaction():  # a killed migration leaves the old version intact
                        migrate(self.connection, stored_version(self.connection, self.path, empty_ok=True))
                self.version = SCHEMA_VERSION
        except BaseException as exc:
            if connection is not None:
                connection.close()
            if isinstance(exc, sqlite3.DatabaseError) and error_code(exc) == SQLITE_NOTADB:
                raise StoreVersionError(f"{self.path} is not a result store: {exc}") from None
            if read_only and isinstance(exc, sqlite3.Error):  # printed as "cannot read PATH: reason"
                raise OSError(0, str(exc), str(self.path)) from exc
            raise

    @contextmanager
    def _writing(self):
        """OSErrors and SQLite's I/O errors (full disk, read-only file, ...) as a WriteFailure naming the store."""
        try:
            yield
        except OSError as exc:
            raise write_failure(self.path, exc) from exc
        except sqlite3.DatabaseError as exc:
            if error_code(exc) not in IO_CODES:
                raise
            raise write_failure(self.path, exc) from exc

    @contextmanager
    def transaction(self):
        """One write transaction, taken at its start (``BEGIN IMMEDIATE``), so reading the columns and writing
        a row cannot interleave with another writer; committed whole or rolled back whole."""
        if self.read_only:
            raise StoreVersionError(f"{self.path} was opened read-only")
        with self._writing():
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.connection.commit()
            except BaseException:
                self.connection.rollback()
                raise

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema growth ------------------------------------------------------------------------
    def _columns(self, table: str) -> set[str]:
        return columns(self.connection, table)

    def _ensure_columns(self, table: str, names: Iterable[str] | dict[str, str]) -> None:
        """Add the missing columns, REAL unless ``names`` maps a name to its SQL type."""
        add_columns(self.connection, table, names)

    # -- runs -----------------------------------------------------------------------------------
    def start_run(self, config: Any, provenance: dict[str, Any]) -> str:
        run_id = uuid.uuid4().hex[:12]
        with self.transaction():
            self.connection.execute("INSERT INTO runs VALUES (?, ?, NULL, ?, ?)",
                                    (run_id, time.time(), _json(config), _json(provenance)))
        return run_id

    def finish_run(self, run_id: str) -> None:
        with self.transaction():
            self.connection.execute("UPDATE runs SET finished_at = ? WHERE run_id = ?", (time.time(), run_id))

    # -- cells ----------------------------------------------------------------------------------
    def status(self, cell_key: str) -> str | None:
        row = self.connection.execute("SELECT status FROM cells WHERE cell_key = ?", (cell_key,)).fetchone()
        return row[0] if row else None

    def cell_state(self, cell_key: str) -> tuple[str | None, str | None]:
        """(status, code_fingerprint) of a stored cell; (None, None) when the store does not have it."""
        row = self.connection.execute("SELECT status, code_fingerprint FROM cells WHERE cell_key = ?",
                                      (cell_key,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def write_cell(self, cell_key: str, run_id: str, config: dict[str, Any], status: str, *,
                   reason: str | None = None, accuracy: float | None = None,
                   summary: dict[str, tuple[float, float, float]] | None = None,
                   per_image: dict[str, list[float]] | None = None, reconstruction: torch.Tensor | None = None,
                   guarantee: dict[str, Any] | None = None, diagnostics: dict[str, Any] | None = None,
                   wall_time_s: float | None = None, peak_rss_mb: float | None = None,
                   code_fingerprint: str | None = None, extra: dict[str, float | str | None] | None = None) -> None:
        """Write (or replace) one cell with its images, atomically. ``code_fingerprint``: the code that computed
        it (``row_fingerprint``; None reads as stale). ``extra``: more columns (e.g. budgets), added on first
        use; names are identifiers that do not shadow the built-in columns."""
        summary = summary or {}
        per_image = per_image or {}
        row: dict[str, Any] = {
            "cell_key": cell_key, "run_id": run_id, "status": status, "reason": reason,
            "dataset": config["dataset"]["name"], "model": model_label(config), "cut": config["cut"],
            "defense": config["defense"]["name"], "defense_params": _json(config["defense"]["params"]),
            "attack": config["attack"]["name"], "attack_params": _json(config["attack"]["params"]),
            "seed": config["seed"], "accuracy": accuracy, "guarantee_json": _json(guarantee or {}),
            "diagnostics_json": _json(diagnostics or {}), "wall_time_s": wall_time_s, "peak_rss_mb": peak_rss_mb,
            "config_json": _json(config), "finished_at": time.time(), "code_fingerprint": code_fingerprint}
        for metric, (mean, low, high) in summary.items():
            row.update({metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        types = {k: "REAL" for k in row}
        for name, value in (extra or {}).items():
            if name in row:
                raise ValueError(f"extra column {name!r} would overwrite a built-in column of the cells table")
            if value is not None and not isinstance(value, (int, float, str)):
                raise ValueError(f"extra column {name!r}: got {value!r}, expected a number, a string or None")
            row[name] = float(value) if isinstance(value, (int, float)) else value
            types[name] = "TEXT" if isinstance(value, str) else "REAL"
        with self.transaction():
            existing = self._columns("cells")
            for name in [k for k in row if k not in existing and row[k] is None and k in (extra or {})]:
                del row[name]  # an extra column's type is known only from its first value
            self._ensure_columns("cells", {k: types[k] for k in row if k not in existing})
            self._ensure_columns("images", per_image)
            names = ", ".join(f'"{k}"' for k in row)
            self.connection.execute(f"INSERT OR REPLACE INTO cells ({names}) VALUES ({', '.join('?' * len(row))})",
                                    list(row.values()))
            self.connection.execute("DELETE FROM images WHERE cell_key = ?", (cell_key,))
            self.connection.execute("DELETE FROM reconstructions WHERE cell_key = ?", (cell_key,))
            if per_image:
                metrics = list(per_image)
                count = len(next(iter(per_image.values())))
                self.connection.executemany(
                    f"INSERT INTO images (cell_key, image_index, {', '.join(metrics)}) "
                    f"VALUES (?, ?, {', '.join('?' * len(metrics))})",
                    [(cell_key, i, *[per_image[m][i] for m in metrics]) for i in range(count)])
            if reconstruction is not None:
                self.connection.execute("INSERT INTO reconstructions VALUES (?, ?)",
                                        (cell_key, encode_images(reconstruction)))

    # -- reading --------------------------------------------------------------------------------
    def cells(self, keys: Iterable[str] | None = None) -> pd.DataFrame:
        """The cells (those of ``keys``, in that order), each with ``is_current`` (see ``mark_current``)."""
        frame = pd.read_sql_query("SELECT * FROM cells ORDER BY rowid", self.connection)
        for name, sql_type in self.connection.execute("SELECT name, type FROM pragma_table_info('cells')"):
            if sql_type == "REAL":  # an all-NULL column (e.g. no CI for too few images) reads back as objects
                frame[name] = pd.to_numeric(frame[name], errors="coerce")
        if "code_fingerprint" not in frame:  # a version-0 store read without migrating it
            frame["code_fingerprint"] = None
        frame = mark_current(frame)
        if keys is not None:
            order = {k: i for i, k in enumerate(keys)}
            frame = frame[frame.cell_key.isin(order)]
            frame = frame.iloc[frame.cell_key.map(order).argsort()].reset_index(drop=True)
        return frame

    def images(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM images ORDER BY cell_key, image_index", self.connection)

    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY started_at", self.connection)

    def reconstruction(self, cell_key: str) -> torch.Tensor | None:
        row = self.connection.execute("SELECT images FROM reconstructions WHERE cell_key = ?",
                                      (cell_key,)).fetchone()
        return decode_images(row[0]) if row else None
