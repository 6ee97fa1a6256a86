"""Attacks by name: ``attacks.get("peel")``."""
from __future__ import annotations

from typing import Any, Callable

from attacks.base import Attack
from splitnn.registry import Registry

_registry: Registry[Attack] = Registry("attack")


def register(name: str) -> Callable[[type[Attack]], type[Attack]]:
    def decorate(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        _registry.register(name)(cls)
        return cls
    return decorate


def get(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name``; bad parameters raise ParameterError before any work."""
    return _registry.get(name, **params)


def names() -> list[str]:
    return _registry.names()
