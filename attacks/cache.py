"""Disk cache for what learned attacks train (decoders, shadow clients), keyed like the model cache."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from splitnn.training import config_hash, default_cache_dir


def cached_module(module: nn.Module, kind: str, key: dict[str, Any] | None, cache_dir: str | Path | None,
                  train: Callable[[nn.Module], None]) -> tuple[nn.Module, bool]:
    """Load ``module``'s state from ``<cache>/attacks/<kind>-<hash of key>.pt`` or run ``train(module)`` and
    save it there (atomically). ``key=None`` (no runner identity for model, cut and defense) trains without
    caching. Returns the module and whether it came from the cache."""
    if key is None:
        train(module)
        return module, False
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "attacks" / \
        f"{kind}-{config_hash(key)}.pt"
    if path.exists():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return module, True
    train(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".pt.tmp{os.getpid()}")  # write, then rename: a killed run never leaves half a file
    torch.save(module.state_dict(), tmp)
    os.replace(tmp, path)
    return module, False
