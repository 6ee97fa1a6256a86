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
(``PRAGMA user_version``, ``SCHEMA_VERSION``): a store of version 0 (written before versions, maybe before
``code_fingerprint``) is migrated on a writable open, its rows then stale; a newer or unknown one is refused
(``StoreVersionError``). ``read_only=True`` (report, export) opens with ``mode=ro``: it never creates, migrates
or changes a store. A failed write (e.g. a full disk) raises ``WriteFailure`` naming the store.
"""
from __future__ import annotations

import io
import json
import sqlite3
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

import attacks
import defenses
from splitnn.faults import write_failure
from splitnn.fingerprint import code_fingerprint

IDENTITY_COLUMNS = ["dataset", "model", "cut", "defense", "defense_params", "attack", "attack_params", "seed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, config_json TEXT, provenance_json TEXT);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY, run_id TEXT, status TEXT NOT NULL, reason TEXT,
    dataset TEXT, model TEXT, cut TEXT, defense TEXT, defense_params TEXT, attack TEXT, attack_params TEXT,
    seed INTEGER, accuracy REAL, guarantee_json TEXT, diagnostics_json TEXT, wall_time_s REAL,
    peak_rss_mb REAL, config_json TEXT, finished_at REAL);
CREATE TABLE IF NOT EXISTS images (
    cell_key TEXT NOT NULL, image_index INTEGER NOT NULL, PRIMARY KEY (cell_key, image_index));
CREATE TABLE IF NOT EXISTS reconstructions (cell_key TEXT PRIMARY KEY, images BLOB);
"""

#: The store layout this code writes; ``MIGRATIONS[v]`` takes a store from version v to v + 1.
SCHEMA_VERSION = 1

#: SQLite result codes (primary, the low byte) that mean the file could not be written or opened, not a bug.
_IO_CODES = {3, 5, 6, 8, 10, 11, 13, 14, 26}  # PERM BUSY LOCKED READONLY IOERR CORRUPT FULL CANTOPEN NOTADB


class StoreVersionError(Exception):
    """A store of a layout this code does not know (written by a newer leakbench, or not a leakbench store)."""


def _migrate_0(store: "ResultStore") -> None:
    """Version 0 (before versions): the tables as they were, maybe without ``code_fingerprint``."""
    store._ensure_columns("cells", {"code_fingerprint": "TEXT"})


MIGRATIONS = {0: _migrate_0}


#: The modules that compute a row besides its attack's and defense's: editing one makes every row stale.
ROW_MODULES = ("evaluation.runner", "evaluation.metrics", "evaluation.evaluators", "evaluation.eval_classifier",
               "evaluation.attack_context", "splitnn.training", "splitnn.split", "splitnn.datasets", "splitnn.zoo")


def row_fingerprint(config: dict[str, Any]) -> str | None:
    """The fingerprint the installed code gives a cell config: its attack's and defense's modules and
    ``ROW_MODULES``, with their imports and the package versions. None when the attack or defense is no
    longer registered (its rows can only be stale)."""
    try:
        attack = attacks.attack_class(config["attack"]["name"])
        defense = defenses.defense_class(config["defense"]["name"])
    except (KeyError, TypeError, ValueError):
        return None
    return code_fingerprint(attack.__module__, defense.__module__, *ROW_MODULES)


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
        self.connection: sqlite3.Connection | None = None
        try:
            if read_only:
                self.connection = self._open_read_only()
                self.version = self._check_version(writable=False)
                return
            with self._writing():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.connection = sqlite3.connect(self.path, timeout=30)
                self._check_version(writable=False)  # refuse a foreign store before changing anything in it
                self.connection.execute("PRAGMA journal_mode=WAL")
                self.version = self._check_version(writable=True)
        except BaseException as exc:
            if self.connection is not None:
                self.connection.close()
            if isinstance(exc, sqlite3.DatabaseError) and (getattr(exc, "sqlite_errorcode", None) or 0) == 26:
                raise StoreVersionError(f"{self.path} is not a result store: {exc}") from None  # SQLITE_NOTADB
            raise

    def _open_read_only(self) -> sqlite3.Connection:
        """``mode=ro``; in a folder where SQLite cannot make the WAL's index, as immutable (nobody writes it)."""
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        try:
            connection = sqlite3.connect(uri, uri=True)
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return connection
        except sqlite3.OperationalError:
            connection = sqlite3.connect(uri + "&immutable=1", uri=True)
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return connection

    def _check_version(self, writable: bool) -> int:
        """The store's layout version after migrating it (when ``writable``); refuses newer or unknown ones."""
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION or version < 0 or (tables and "cells" not in tables):
            what = f"layout version {version}" if "cells" in tables else "no cells table"
            raise StoreVersionError(
                f"{self.path} is not a result store this leakbench can read ({what}; it reads versions 0 to "
                f"{SCHEMA_VERSION}): " + ("upgrade leakbench" if version > SCHEMA_VERSION else
                                          "give --out a folder of its own"))
        if not tables and self.read_only:
            raise StoreVersionError(f"{self.path} holds no tables: not a result store (run `leakbench run` first)")
        if not writable or version == SCHEMA_VERSION:
            return version
        with self.transaction():  # one transaction: a killed migration leaves the old version intact
            for statement in filter(str.strip, _SCHEMA.split(";")):  # version 0's tables (a fresh store)
                self.connection.execute(statement)
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](self)
            self.connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return SCHEMA_VERSION

    @contextmanager
    def _writing(self):
        """OSErrors and SQLite's I/O errors (full disk, read-only file, ...) as a WriteFailure naming the store."""
        try:
            yield
        except OSError as exc:
            raise write_failure(self.path, exc) from exc
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF not in _IO_CODES - {26}:
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
        return {row[1] for row in self.connection.execute(f"PRAGMA table_info({table})")}

    def _ensure_columns(self, table: str, names: Iterable[str] | dict[str, str]) -> None:
        """Add the missing columns, REAL unless ``names`` maps a name to its SQL type."""
        types = names if isinstance(names, dict) else dict.fromkeys(names, "REAL")
        existing = self._columns(table)
        for name, sql_type in types.items():
            if name not in existing:
                if not (name.isascii() and name.isidentifier()):
                    raise ValueError(f"bad column name {name!r}: expected a Python identifier")
                self.connection.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {sql_type}')

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
