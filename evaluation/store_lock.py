"""One writer per results folder: ``leakbench run`` holds an exclusive ``flock`` on ``DIR/.leakbench.lock``
while it writes. The file records who holds it (pid and start time) for the message a second run prints; the
kernel drops the lock when its process dies, so a lock left by a killed run never blocks the next one."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import time
from pathlib import Path

from leakbench.splitnn.faults import writing

LOCK_NAME = ".leakbench.lock"


class StoreBusy(Exception):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, pid: int | None, since: float | None):
        self.folder, self.pid, self.since = folder, pid, since
        who = f"process {pid}" if pid else "another process"
        when = datetime.datetime.fromtimestamp(since, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") \
            if since else "an unknown time"
        super().__init__(f"{folder} is being written by {who} since {when}")


def holder(path: Path) -> tuple[int | None, float | None]:
    """(pid, start time) recorded in a lock file; (None, None) when it holds nothing readable."""
    try:
        data = json.loads(path.read_text() or "{}")
        return int(data["pid"]), float(data["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


class RunLock:
    """``with RunLock(folder, wait=False):`` holds the folder's write lock, or raises StoreBusy (``wait``: blocks
    until the holder finishes; ``on_wait(StoreBusy)`` is told once before blocking)."""

    def __init__(self, folder: str | Path, wait: bool = False, on_wait=None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait = wait
        self.on_wait = on_wait
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        with writing(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = StoreBusy(self.folder, *holder(self.path))
                if not self.wait:
                    raise busy from None
                if self.on_wait is not None:
                    self.on_wait(busy)
                fcntl.flock(fd, fcntl.LOCK_EX)
            with writing(self.path):  # the file is never unlinked: a waiter may hold it open
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass  # the lock goes with the descriptor either way
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
