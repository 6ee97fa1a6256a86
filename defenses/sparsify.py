"""Defenses that coarsen the features at the cut: quantization, top-k sparsification, dropout."""
from __future__ import annotations

import math
from typing import Any

import torch

from defenses.base import Defense
from defenses.registry import register
from splitnn.errors import ParameterError, check_bool, check_choice, check_number


@register("quantization")
class Quantization(Defense):
    """Rounds every feature to one of ``2**bits`` evenly spaced levels.

    ``range="sample"``: the levels span each sample's own [min, max]; ``range="fixed"``: features are
    clamped to [``low``, ``high``] first. ``bits=None`` keeps full precision (strength 0).
    """

    def __init__(self, bits: int | None = 8, range: str = "sample", low: float = 0.0, high: float = 1.0,
                 seed: int = 0):
        super().__init__(seed)
        self.bits = None if bits is None else check_number("bits", bits, low=1, high=32, integer=True)
        self.range = check_choice("range", range, ("sample", "fixed"))
        self.low = float(check_number("low", low))
        self.high = float(check_number("high", high))
        if self.range == "fixed" and not self.high > self.low:
            raise ParameterError("high", high, f"a number > low ({self.low}) for range 'fixed'")

    @property
    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "range": self.range, "low": self.low, "high": self.high}

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return features
        steps = 2.0 ** self.bits - 1
        if self.range == "fixed":
            low, width = self.low, self.high - self.low
            return low + torch.round((features.clamp(self.low, self.high) - low) / width * steps) / steps * width
        shape = (-1,) + (1,) * (features.dim() - 1)
        flat = features.flatten(1)
        low = flat.min(dim=1).values.view(shape)
        width = (flat.max(dim=1).values.view(shape) - low).clamp_min(torch.finfo(features.dtype).tiny)
        return low + torch.round((features - low) / width * steps) / steps * width


@register("topk")
class TopK(Defense):
    """Keeps the ``keep`` fraction of each sample's features with the largest magnitude (at least one),
    zeroing the rest; ``keep=1`` is the identity."""

    def __init__(self, keep: float = 0.1, seed: int = 0):
        super().__init__(seed)
        self.keep = float(check_number("keep", keep, low=0, high=1, low_open=True))

    @property
    def params(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(1)
        k = max(1, math.ceil(self.keep * flat.shape[1]))
        if k >= flat.shape[1]:
            return features
        index = flat.abs().topk(k, dim=1).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter(1, index, True)
        return (flat * mask).view_as(features)


@register("dropout")
class CutDropout(Defense):
    """Zeroes each feature with probability ``p`` at inference (seeded), scaling the survivors by
    1/(1-p) when ``rescale`` so the expected features are unchanged; ``p=0`` is the identity."""

    def __init__(self, p: float = 0.1, rescale: bool = True, seed: int = 0):
        super().__init__(seed)
        self.p = float(check_number("p", p, low=0, high=1, high_open=True))
        self.rescale = check_bool("rescale", rescale)

    @property
    def params(self) -> dict[str, Any]:
        return {"p": self.p, "rescale": self.rescale}

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return features
        keep = torch.rand(features.shape, generator=self.generator(features.device), dtype=features.dtype,
                          device=features.device) >= self.p
        out = features * keep
        return out / (1.0 - self.p) if self.rescale else out
