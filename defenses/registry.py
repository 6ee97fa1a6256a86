"""Defenses by name: ``defenses.get("gaussian_noise", scale=0.1)``, and the training defense a training config
names, as hooks for ``splitnn.train`` (``hooks_for``)."""
from __future__ import annotations

from typing import Any, Callable

from leakbench.defenses.base import Defense, TrainingDefense
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.registry import Registry
from leakbench.splitnn.training import TrainConfig

_registry: Registry[Defense] = Registry("defense")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make the defense available as ``get(name, ...)``."""
    return _registry.register_class(name)


def get(name: str, **params: Any) -> Defense:
    """Build the defense registered as ``name``; bad parameters raise ParameterError before any work."""
    return _registry.get(name, **params)


def unregister(name: str) -> None:
    """Forget the defense registered as ``name`` (one registered for a while, e.g. by a test)."""
    _registry.unregister(name)


def names() -> list[str]:
    return _registry.names()


def defense_class(name: str) -> type[Defense]:
    """The class registered as ``name`` (its ``kind`` and hooks), without building it."""
    return _registry.factory(name)  # type: ignore[return-value]


def hooks_for(config: TrainConfig) -> TrainingDefense | None:
    """The training defense ``config.defense`` names, seeded with ``config.seed`` and given its cut: the hooks
    to pass to ``splitnn.train(config, hooks=...)``; None for a plain config. A bad name, kind, parameter or a
    missing cut raises ParameterError naming it, before any work."""
    if config.defense is None:
        return None
    name = config.defense["name"]
    defense = get(name, seed=config.seed, **config.defense.get("params", {}))
    if not isinstance(defense, TrainingDefense):
        raise ParameterError("defense.name", name,
                             "a training defense (transform defenses act at inference, not in train())")
    if defense.uses_cut and config.cut is None:
        raise ParameterError("cut", None, f"the cut at which {name} trains")
    defense.cut = config.cut
    return defense
