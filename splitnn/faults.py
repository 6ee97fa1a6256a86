"""File-system faults as clear errors: a failed write names the file being written (not a temporary name, or
none), and a cache file that cannot be loaded is moved aside, kept for inspection, and rebuilt."""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class WriteFailure(OSError):
    """Writing ``filename`` failed (a full disk, a read-only or missing folder, no permission). The command line
    prints it as "cannot write PATH: reason" and stops, keeping what was written before; a cell never stores it
    as its own failure, since every later cell would meet the same disk."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class CorruptCacheWarning(UserWarning):
    """A cached checkpoint could not be loaded; it was moved aside and is being rebuilt."""


def write_failure(path: str | Path, exc: BaseException) -> WriteFailure:
    """``exc`` (an OSError, or e.g. SQLite's "database or disk is full") as a WriteFailure naming ``path``."""
    if isinstance(exc, WriteFailure):
        return exc
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return WriteFailure(getattr(exc, "errno", None) or 0, reason, str(path))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised inside into a WriteFailure that names ``path`` (or the file the error names, when
    ``path`` is the folder being written into)."""
    try:
        yield
    except WriteFailure:
        raise
    except OSError as exc:
        named = exc.filename if exc.filename and Path(path).is_dir() else path
        raise write_failure(named, exc) from exc


def set_aside(path: Path, error: BaseException, *also: Path) -> Path | None:
    """Move a cache file that failed to load (and its companions ``also``, e.g. a JSON sidecar) to
    ``NAME.corrupt-<UTC time>-<pid>`` beside it, warn naming both paths, and return the new path (None when
    another process moved it first). The caller then rebuilds the file."""
    stamp = f"corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    moved = None
    for i, source in enumerate((path, *also)):
        target = source.with_name(f"{source.name}.{stamp}")
        with writing(target):
            try:
                os.replace(source, target)
            except FileNotFoundError:
                continue
        moved = target if i == 0 else moved
    warnings.warn(f"{path} could not be loaded ({type(error).__name__}: {str(error)[:200]}); "
                  + (f"moved it to {moved}" if moved else "another process moved it aside")
                  + " and rebuilding it", CorruptCacheWarning, stacklevel=3)
    return moved
