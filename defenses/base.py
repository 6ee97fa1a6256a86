"""The Defense base: what stands between the client and the server, and what it guarantees."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from splitnn.errors import check_number

Kind = Literal["transform", "training"]


class Defense:
    """A defense declares its ``kind``:

    - ``"transform"``: acts on the features at the cut at inference time; ``__call__(features)``.
    - ``"training"``: changes how the model is trained (hooks ``splitnn.train``).

    Randomness comes from ``seed`` alone, so a cell is reproducible.
    """

    kind: ClassVar[Kind] = "transform"
    name: ClassVar[str] = "defense"

    def __init__(self, seed: int = 0):
        self.seed = check_number("seed", seed, low=0, integer=True)
        self._generator: torch.Generator | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The public parameters that define this defense (what goes into a result row)."""
        return {}

    def guarantee(self) -> dict[str, Any]:
        """A formal guarantee, e.g. ``{"epsilon": 1.0, "delta": 1e-5}``; empty when there is none."""
        return {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The defense's random stream, seeded once and advanced by every call."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind != "transform":
            return features
        return self.transform(features)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a transform defense without a transform()")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
