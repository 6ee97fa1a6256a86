"""The Attack base: what an attacker knows, which cells it applies to, and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn


class Knowledge(str, Enum):
    """What an attacker is assumed to know besides the features it receives."""

    CLIENT_WEIGHTS = "client_weights"   # white-box: the client half's architecture and weights
    AUXILIARY_DATA = "auxiliary_data"   # samples from the same distribution as the private data
    QUERY_ACCESS = "query_access"       # can run the client half on inputs of its choice
    DEFENSE = "defense"                 # knows the defense's kind and public parameters
    SERVER_WEIGHTS = "server_weights"   # holds the server half (an honest-but-curious server does)


@dataclass
class Reconstruction:
    """Reconstructed images (N, C, H, W) in [0, 1], plus what the attack reports about itself."""

    images: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: other reconstructions the attack produced on the way (e.g. PEEL's block-wise image before refinement)
    alternatives: dict[str, torch.Tensor] = field(default_factory=dict)


class Attack:
    """A reconstruction attack on the features sent at the cut."""

    name: ClassVar[str] = "attack"
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset()

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        """Whether this attack makes sense against ``client`` behind ``defense``, and if not, why."""
        return True, ""

    def reconstruct(self, client: nn.Module, features: torch.Tensor, **ctx: Any) -> Reconstruction:
        """Recover the client's inputs from ``features``. ``ctx`` carries e.g. ``image_shape``, ``defense``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def require_image_shape(ctx: dict[str, Any]) -> tuple[int, int, int]:
    shape = ctx.get("image_shape")
    if shape is None or len(shape) != 3:
        raise ValueError("reconstruct() needs image_shape=(C, H, W) of the client's input")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def require_context(ctx: dict[str, Any], attack: str, *names: str) -> list[Any]:
    """The named context entries, or a clear error saying what the attack needs and why."""
    missing = [n for n in names if ctx.get(n) is None]
    if missing:
        raise ValueError(f"{attack} needs {', '.join(missing)} in reconstruct(...) (auxiliary=(images, labels), "
                         "query=images -> defended features, server=the server half); the runner passes them "
                         "by the attack's declared knowledge")
    return [ctx[n] for n in names]
