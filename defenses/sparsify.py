"""Defenses that coarsen the features at the cut: quantization, top-k sparsification, dropout."""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from leakbench.defenses.base import FeatureDefense
from leakbench.defenses.registry import register
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.params import Fraction, Seed


@register("quantization")
class Quantization(FeatureDefense):
    """Rounds every feature to one of ``2**bits`` evenly spaced levels.

    ``range="sample"``: the levels span each sample's own [min, max]; ``range="fixed"``: features are
    clamped to [``low``, ``high``] first. ``bits=None`` keeps full precision (strength 0).
    """

    strength_zero = {"bits": None}

    def __init__(self, bits: Annotated[int, Field(ge=1, le=32)] | None = 8,
                 range: Literal["sample", "fixed"] = "sample",
                 low: float = 0.0, high: float = 1.0, seed: Seed = 0):
        super().__init__(seed)
        self.bits, self.range, self.low, self.high = bits, range, low, high
        if self.range == "fixed" and not self.high > self.low:
            raise ParameterError("high", high, f"a number > low ({self.low}) for range 'fixed'")

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return features
        steps = 2.0 ** self.bits - 1
        low: float | torch.Tensor
        width: float | torch.Tensor
        if self.range == "fixed":
            low, width = self.low, self.high - self.low
            return low + torch.round((features.clamp(self.low, self.high) - low) / width * steps) / steps * width
        shape = (-1,) + (1,) * (features.dim() - 1)
        flat = features.flatten(1)
        low = flat.min(dim=1).values.view(shape)
        width = (flat.max(dim=1).values.view(shape) - low).clamp_min(torch.finfo(features.dtype).tiny)
        return low + torch.round((features - low) / width * steps) / steps * width


@register("topk")
class TopK(FeatureDefense):
    """Keeps the ``keep`` fraction of each sample's features with the largest magnitude (at least one),
    zeroing the rest; ``keep=1`` is the identity."""

    strength_zero = {"keep": 1.0}

    def __init__(self, keep: Annotated[float, Field(gt=0, le=1)] = 0.1, seed: Seed = 0):
        super().__init__(seed)
        self.keep = keep

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(1)
        k = max(1, math.ceil(self.keep * flat.shape[1]))
        if k >= flat.shape[1]:
            return features
        index = flat.abs().topk(k, dim=1).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter(1, index, True)
        return (flat * mask).view_as(features)


@register("dropout")
class CutDropout(FeatureDefense):
    """Zeroes each feature with probability ``p`` at inference (seeded), scaling the survivors by
    1/(1-p) when ``rescale`` so the expected features are unchanged; ``p=0`` is the identity."""

    strength_zero = {"p": 0.0}
    #: Why ``evaluation.dfil`` reports no Fisher bound for it: random, but with no density about the input.
    no_noise_reason = ("random, but each surviving feature is released exactly (no density about the input): "
                       "its Fisher information is unbounded")

    def __init__(self, p: Fraction = 0.1, rescale: bool = True, seed: Seed = 0):
        super().__init__(seed)
        self.p, self.rescale = p, rescale

    def noise_law(self) -> None:
        """No additive noise law: the mask hides features but leaves the kept ones exact (``no_noise_reason``)."""
        return None

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return features
        keep = torch.rand(features.shape, generator=self.generator(features.device), dtype=features.dtype,
                          device=features.device) >= self.p
        out = features * keep
        return out / (1.0 - self.p) if self.rescale else out
