"""Attacks by name: ``attacks.get("peel")``."""
from __future__ import annotations

from typing import Any, Callable

from leakbench.attacks.base import Attack
from leakbench.splitnn.registry import Registry

_registry: Registry[Attack] = Registry("attack")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make the attack available as ``get(name, ...)``."""
    return _registry.register_class(name)


def get(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name``; bad parameters raise ParameterError before any work."""
    return _registry.get(name, **params)


def names() -> list[str]:
    return _registry.names()


def attack_class(name: str) -> type[Attack]:
    """The class registered as ``name`` (its module, declared knowledge), without building it."""
    return _registry.factory(name)  # type: ignore[return-value]
