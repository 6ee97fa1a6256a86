"""Defenses by name: ``defenses.get("gaussian_noise", scale=0.1)``."""
from __future__ import annotations

from typing import Any, Callable

from defenses.base import Defense
from splitnn.registry import Registry

_registry: Registry[Defense] = Registry("defense")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make the defense available as ``get(name, ...)``."""
    return _registry.register_class(name)


def get(name: str, **params: Any) -> Defense:
    """Build the defense registered as ``name``; bad parameters raise ParameterError before any work."""
    return _registry.get(name, **params)


def names() -> list[str]:
    return _registry.names()


def defense_class(name: str) -> type[Defense]:
    """The class registered as ``name`` (its ``kind`` and hooks), without building it."""
    return _registry.factory(name)  # type: ignore[return-value]
