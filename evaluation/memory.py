"""The peak memory of one block of work (a cell), not of the process so far.

``resource.getrusage(...).ru_maxrss`` is the high-water mark of the whole process: once one cell has used
2 GB, every later cell reports 2 GB. ``PeakMemory`` instead samples this process's resident set size from a
daemon thread every ``interval`` seconds between entering and leaving the block, and reports

* ``peak_rss_mb``: the largest resident size seen during the block (MiB);
* ``rise_mb``: that peak minus the resident size on entry (what the block added on top of what was resident);
* ``peak_cuda_mb``: ``torch.cuda.max_memory_allocated`` over the block after ``reset_peak_memory_stats``, when
  CUDA is available (else None). Untested here: the machines the tests run on have no GPU.

A spike shorter than the interval can fall between two samples. The lifetime mark catches part of that: when
``ru_maxrss`` rose during the block, the process's peak so far was reached inside it, so the block's peak is at
least the new mark, and it is taken when larger than the samples.

The resident size is read from ``/proc/self/statm`` (Linux, a few microseconds), else from psutil when it is
installed (it is not a dependency), else it is unknown (None), and only the lifetime mark is left.
Measurements are per process: cells computed concurrently in one process (threaded Dask workers) share them.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType
from typing import Callable

import torch

MIB = 1024 * 1024


def _statm() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _psutil() -> int | None:
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _reader() -> Callable[[], int | None]:
    """How this platform reads the resident size in bytes: /proc, else psutil, else nothing."""
    if _statm() is not None:
        return _statm
    if _psutil() is not None:
        return _psutil
    return lambda: None


rss_bytes = _reader()


def lifetime_peak_bytes() -> int:
    """The process's resident high-water mark so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_rss_mb``, ``m.rise_mb``, ``m.peak_cuda_mb``."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.peak_cuda_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = rss_bytes()
        if now is not None and (self.peak_bytes is None or now > self.peak_bytes):
            self.peak_bytes = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._lifetime_before = lifetime_peak_bytes()
        self.start_bytes = self.peak_bytes = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, name="leakbench-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        lifetime = lifetime_peak_bytes()
        if lifetime > self._lifetime_before:  # the process's peak so far was reached inside the block
            self.peak_bytes = max(self.peak_bytes or 0, lifetime)
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / MIB

    @property
    def peak_rss_mb(self) -> float | None:
        """The block's peak resident size in MiB (None: unreadable on this platform and no new lifetime mark)."""
        return None if self.peak_bytes is None else self.peak_bytes / MIB

    @property
    def rise_mb(self) -> float | None:
        """The block's peak over the resident size on entry, in MiB."""
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return (self.peak_bytes - self.start_bytes) / MIB
