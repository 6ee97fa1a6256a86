"""The result store's layout and its versions (``PRAGMA user_version``): what a fresh store is created with,
how an older one is migrated, and which stores are refused (newer, foreign), each with a message naming the
file and the versions. ``evaluation.store.ResultStore`` applies it on open."""
from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path
from typing import Iterable

#: Version 0's tables (the layout before versions); a fresh store is made of them and migrated like an old one.
TABLES = """
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

#: The layout this code writes; ``MIGRATIONS[v]`` takes a store from version v to v + 1.
SCHEMA_VERSION = 1

#: SQLite primary result codes that mean the file could not be written or opened (not a bug in a statement).
IO_CODES = {3, 5, 6, 8, 10, 11, 13, 14}  # PERM BUSY LOCKED READONLY IOERR CORRUPT FULL CANTOPEN
SQLITE_NOTADB = 26


class StoreVersionError(Exception):
    """A store of a layout this code does not know (written by a newer leakbench, or not a leakbench store)."""


def error_code(exc: sqlite3.Error) -> int:
    """The primary SQLite result code of ``exc`` (0 when it has none, e.g. one raised by hand)."""
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def columns(connection: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}


def add_columns(connection: sqlite3.Connection, table: str, names: Iterable[str] | dict[str, str]) -> None:
    """Add the missing columns, REAL unless ``names`` maps a name to its SQL type."""
    types = names if isinstance(names, dict) else dict.fromkeys(names, "REAL")
    existing = columns(connection, table)
    for name, sql_type in types.items():
        if name not in existing:
            if not (name.isascii() and name.isidentifier()):
                raise ValueError(f"bad column name {name!r}: expected a Python identifier")
            connection.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {sql_type}')


def _migrate_0(connection: sqlite3.Connection) -> None:
    """Version 0 -> 1: a store written before ``code_fingerprint`` gets the column (its rows read as stale)."""
    add_columns(connection, "cells", {"code_fingerprint": "TEXT"})


MIGRATIONS = {0: _migrate_0}


def open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (``mode=ro``): it never creates, migrates or changes the store."""
    connection = sqlite3.connect(f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True)
    connection.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a file that is no database fails here
    return connection


def stored_version(connection: sqlite3.Connection, path: Path, *, empty_ok: bool) -> int:
    """The store's layout version; StoreVersionError for a newer or foreign one (or an empty file, unless
    ``empty_ok``: a store about to be created)."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version > SCHEMA_VERSION or version < 0 or (tables and "cells" not in tables):
        what = f"layout version {version}" if "cells" in tables else "no cells table"
        raise StoreVersionError(
            f"{path} is not a result store this leakbench can read ({what}; it reads versions 0 to "
            f"{SCHEMA_VERSION}): " + ("upgrade leakbench" if version > SCHEMA_VERSION else
                                      "give --out a folder of its own"))
    if not tables and not empty_ok:
        raise StoreVersionError(f"{path} holds no tables: not a result store (run `leakbench run` first)")
    return version


def needs_migration(connection: sqlite3.Connection, version: int) -> bool:
    """Whether the store lacks anything of the current layout (an old version, or a column dropped by hand)."""
    return version < SCHEMA_VERSION or "code_fingerprint" not in columns(connection, "cells")


def migrate(connection: sqlite3.Connection, version: int) -> None:
    """Bring a store of ``version`` (inside the caller's write transaction) to ``SCHEMA_VERSION``; the steps
    are idempotent, so a store that says it is current but lacks a column is mended too."""
    for statement in filter(str.strip, TABLES.split(";")):
        connection.execute(statement)
    for step in range(min(version, SCHEMA_VERSION - 1), SCHEMA_VERSION):
        MIGRATIONS[step](connection)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
