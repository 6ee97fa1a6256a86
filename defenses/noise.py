"""Noise injection at the cut."""
from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense
from defenses.registry import register
from splitnn.errors import check_bool, check_number


@register("none")
class NoDefense(Defense):
    """The undefended baseline: features pass unchanged."""

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return features


@register("gaussian_noise")
class GaussianNoise(Defense):
    """Adds N(0, sigma^2) to every feature.

    ``sigma = scale`` when ``relative`` is false; otherwise ``sigma = scale * RMS`` of each
    sample's own features, so one ``scale`` means the same signal-to-noise ratio at any cut.
    """

    def __init__(self, scale: float = 0.1, relative: bool = True, seed: int = 0):
        super().__init__(seed)
        self.scale = float(check_number("scale", scale, low=0))
        self.relative = check_bool("relative", relative)

    @property
    def params(self) -> dict[str, Any]:
        return {"scale": self.scale, "relative": self.relative}

    def sigma(self, features: torch.Tensor) -> torch.Tensor:
        """Per-sample noise standard deviation, shaped to broadcast against ``features``."""
        if not self.relative:
            return torch.full((features.shape[0],) + (1,) * (features.dim() - 1), self.scale,
                              dtype=features.dtype, device=features.device)
        rms = features.flatten(1).pow(2).mean(dim=1).sqrt()
        return (self.scale * rms).view(-1, *([1] * (features.dim() - 1)))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return features
        noise = torch.randn(features.shape, generator=self.generator(features.device),
                            dtype=features.dtype, device=features.device)
        return features + self.sigma(features) * noise
