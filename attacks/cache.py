"""Disk cache for what learned attacks train (decoders, shadow clients), keyed like the model cache: by the
hash of the runner's identity and the fingerprint of the attack's code, so other code never loads as current."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from leakbench.attacks.registry import attack_class, names
from leakbench.splitnn.faults import set_aside
from leakbench.splitnn.fingerprint import class_fingerprint
from leakbench.splitnn.training import atomic_save, config_hash, default_cache_dir


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def attack_fingerprint(kind: str) -> str:
    """The code fingerprint of the attack registered as ``kind`` (its module and what that imports)."""
    if kind not in names():
        raise ValueError(f"no attack is registered as {kind!r}: pass cached_module(..., fingerprint=...)")
    return class_fingerprint(attack_class(kind))


def cached_module(module: ModuleT, kind: str, key: dict[str, Any] | None, cache_dir: str | Path | None,
                  train: Callable[[ModuleT], None], *, fingerprint: str | None = None) -> tuple[ModuleT, bool]:
    """Load ``module``'s state from ``<cache>/attacks/<kind>-<hash of key>-<fingerprint>.pt`` or run
    ``train(module)`` and save it there (atomically). ``fingerprint`` defaults to that of the attack registered
    as ``kind``. ``key=None`` (no runner identity for model, cut and defense) trains without caching. Returns
    the module and whether it came from the cache. A cached file that fails to load is moved aside (with a
    warning naming both paths) and the module trained again from its state on entry."""
    if key is None:
        train(module)
        return module, False
    fingerprint = fingerprint or attack_fingerprint(kind)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "attacks" / \
        f"{kind}-{config_hash(key)}-{fingerprint}.pt"
    if path.exists():
        pristine = {k: v.clone() for k, v in module.state_dict().items()}  # a failed load may overwrite half
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
            return module, True
        except Exception as exc:  # a truncated or foreign file: moved aside (kept), trained again from scratch
            set_aside(path, exc)
            module.load_state_dict(pristine)
    train(module)
    atomic_save(path, lambda file: torch.save(module.state_dict(), file))  # a killed run never leaves half a file
    return module, False
