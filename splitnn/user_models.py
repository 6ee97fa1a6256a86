"""Models from outside the zoo, and the user's weights for them.

A config names them ``torchvision:resnet18`` (a torchvision architecture, built with ``weights=None``: nothing
is ever downloaded) or ``package.module:function`` (the user's own factory, importable from ``sys.path``).
A weights file is a state dict loaded with ``torch.load(..., weights_only=True)``; it is checked against the
model's parameter names and shapes (on the meta device at validation, so no memory is spent there).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from leakbench.splitnn.errors import ParameterError

TORCHVISION = "torchvision:"


def is_user_model(name: str) -> bool:
    """Whether ``name`` names a torchvision architecture or a factory rather than a zoo entry."""
    return ":" in name


def factory_module(name: str) -> str | None:
    """The module of the user's factory ``package.module:function`` (its code is the user's, so it enters the
    fingerprint of the rows it computes); None for a zoo entry or a torchvision architecture."""
    if not is_user_model(name) or name.startswith(TORCHVISION):
        return None
    return name.partition(":")[0] or None


def factory(name: str) -> Callable[..., nn.Module]:
    """The builder of ``name``: called with the model's params and ``num_classes`` / ``in_channels``."""
    if name.startswith(TORCHVISION):
        return _torchvision(name.removeprefix(TORCHVISION))
    return _user_factory(name)


def _torchvision(arch: str) -> Callable[..., nn.Module]:
    import torchvision.models

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(torchvision.models)))
        raise ParameterError("name", f"{TORCHVISION}{arch}", f"a torchvision classification model: {known}") from None

    @functools.wraps(builder)
    def build(num_classes: int = 1000, in_channels: int = 3, **params: Any) -> nn.Module:
        if in_channels != 3:
            raise ParameterError("in_channels", in_channels, f"3: torchvision's {arch} takes RGB images (set the "
                                                             "dataset's channels to 3)")
        if "weights" in params or "progress" in params:
            raise ParameterError("weights", params.get("weights"), "a file given as the model entry's 'weights' "
                                                                   "(torchvision's own weights are downloaded)")
        return builder(weights=None, num_classes=num_classes, **params)

    build.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("num_classes", inspect.Parameter.KEYWORD_ONLY, default=1000, annotation=int),
        inspect.Parameter("in_channels", inspect.Parameter.KEYWORD_ONLY, default=3, annotation=int),
        inspect.Parameter("params", inspect.Parameter.VAR_KEYWORD)])
    build.__annotations__ = {"num_classes": int, "in_channels": int}
    del build.__wrapped__  # the schema reads this signature, not the builder's
    return build


def _user_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, function = name.partition(":")
    expected = "package.module:function, importable from sys.path (e.g. PYTHONPATH), returning an nn.Module"
    if not module_name or not function:
        raise ParameterError("name", name, expected)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ParameterError("name", name, f"{expected} ({exc})") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise ParameterError("name", name, f"{expected}: {module_name} has no function {function!r}")
    accepted = inspect.signature(build).parameters

    @functools.wraps(build)
    def call(**params: Any) -> nn.Module:
        # num_classes / in_channels come from the dataset; a factory that takes neither just gets its params
        for given in ("num_classes", "in_channels"):
            if given not in accepted and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
                params.pop(given, None)
        model = build(**params)
        if not isinstance(model, nn.Module):
            raise ParameterError("name", name, f"a factory returning an nn.Module; it returned {type(model).__name__}")
        return model

    return call


def file_digest(path: str | Path) -> str:
    """SHA-256 of a weights file (the first 16 hex digits): it names the file's content in cell keys."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """The state dict in ``path`` (``weights_only=True``; a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ParameterError("weights", str(path), f"an existing state-dict file ({file.resolve()} is not a file)")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, a truncated file, a file that is not torch's
        raise ParameterError("weights", str(path), f"a state dict saved by torch.save ({type(exc).__name__}: "
                                                   f"{str(exc)[:200]})") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ParameterError("weights", str(path), "a state dict (a mapping of names to tensors)")
    return loaded


def check_weights(model: nn.Module, path: str | Path) -> Mapping[str, torch.Tensor]:
    """The file's state dict, if its names and shapes are exactly ``model``'s (which may live on the meta device)."""
    state = read_state_dict(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k]} (the model's is {expected[k]})" for k in sorted(set(expected) & set(found))
              if expected[k] != found[k]]
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []) + \
        ([f"shape of {', '.join(shapes[:3])}"] if shapes else [])
    if problems:
        raise ParameterError("weights", str(path), f"the state dict of this model; it differs: {'; '.join(problems)}")
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` with the checked state dict of ``path`` loaded."""
    model.load_state_dict(check_weights(model, path))
    return model
