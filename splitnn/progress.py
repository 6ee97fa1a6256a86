"""Progress bars inside long attacks, switched on and off by whoever runs them.

An attack cannot know whether it runs under ``leakbench run`` (bars wanted), ``--quiet``, a test or a Dask
worker (bars unwanted), and threading a ``progress`` argument through every solver would put a display concern
in every signature. Instead the runner says once, around the attack call::

    with attack_progress(matrix.progress):
        attack.reconstruct(...)

and code anywhere below asks for a bar::

    with progress_bar(max_iter, "L-BFGS") as bar:
        for ...:
            bar.update()

The switch is a ``contextvars.ContextVar``: it is off by default (a library call, a test, a worker shows
nothing), it holds per thread and per asyncio task, and leaving the ``with`` restores what was set before.
Bars are transient (``leave=False``): they vanish when done, so the runner's bar over cells stays readable.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from tqdm.auto import tqdm

__all__ = ["attack_progress", "progress_bar", "progress_enabled"]

_ENABLED: ContextVar[bool] = ContextVar("leakbench_attack_progress", default=False)


@contextmanager
def attack_progress(enabled: bool) -> Iterator[None]:
    """Show (``True``) or hide (``False``) every ``progress_bar`` opened inside this block."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def progress_enabled() -> bool:
    """Whether bars opened here are shown (the innermost ``attack_progress``; off outside any)."""
    return _ENABLED.get()


def progress_bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A transient tqdm bar over ``total`` steps, disabled (a no-op on ``update``) unless progress is on here.
    Use it as a context manager, or ``close()`` it, so a stopped-early loop does not leave it open."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not _ENABLED.get(), dynamic_ncols=True)
