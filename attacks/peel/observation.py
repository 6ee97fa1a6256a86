"""Observation models of defense-aware PEEL: how the observed features ``y`` relate to the clean features
``f(x)``, one small class per kind, each turned into the data term and priors its fits minimise.

- ``Exact``: y = f (plain PEEL's fit).
- ``Noisy``: y = clip(f) + σ·n: MAP with the known σ; each stage a least squares pulled toward its warm start
  with weight s² (s = σ relative to the features' RMS), the image a least squares plus σ²·β·TV(x).
- ``Masked``: y = scale·f on the released entries (dropout's survivors scaled back by 1-p); top-k's zeros also
  say ``|f| <=`` the smallest released magnitude.
- ``Quantized``: f lies in its bin [low, high]. A pure within-bin fit left the image too free on 2-bit features
  (worse than plain PEEL at 16x16), so the data term is the squared distance to the bin centre (the Gaussian
  surrogate, std width/sqrt 12, which also weights the TV prior) plus ``BIN_WEIGHT`` x the distance outside.

Readers (``attacks.peel.readers``) build them from a ``PublicDefense``. Every term gives one value per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from leakbench.attacks.priors import (Forward, Loss, binned_error, binned_error_through_relu, least_norm, masked_error,
                            masked_error_through_relu, squared_error, sum_per_sample, total_variation, tv_prior)

#: Quantization: weight of the squared distance outside a bin, against the squared distance to its centre.
BIN_WEIGHT = 10.0


@dataclass
class Exact:
    """y = f(x): the exact fit of plain PEEL (no defense, a defense at strength 0, or no model of it)."""

    kind: ClassVar[str] = "exact"
    #: whether the fits differ from plain PEEL's, and whether every stage (not only the cut) is refitted
    changes_fit: ClassVar[bool] = False
    every_stage: ClassVar[bool] = False

    observed: torch.Tensor
    defense: str = "none"
    note: str = "exact fit"
    extras: dict[str, Any] = field(default_factory=dict)

    def model(self) -> str:
        """The model's name in the diagnostics."""
        return self.kind

    def data_loss(self, forward: Forward, pre_relu: Forward | None = None) -> Loss:
        """The data term of a fit whose output is the observed features, half a sum of squares per sample;
        ``pre_relu`` (``forward`` without its final ReLU) lets a model keep its term smooth below zero."""
        return squared_error(forward, self.observed)

    def cut_target(self, target: torch.Tensor) -> torch.Tensor:
        """What the warm start at the cut inverts: the observation itself, or what it says of f."""
        return target

    def stage_prior(self, target: torch.Tensor, x0: torch.Tensor) -> Loss | None:
        """A stage's regulariser under this model (``x0``: its warm start)."""
        return None

    def image_prior(self, tv_weight: float, tv_prior_rate: float) -> Loss | None:
        """The refinement's regulariser: the user's TV weight."""
        return tv_prior(tv_weight)

    def diagnostics(self) -> dict[str, Any]:
        return {"defense": self.defense, "model": self.model(), "note": self.note, **self.extras}


@dataclass
class Unmodelled(Exact):
    """A defense with no registered reader: plain PEEL, and the row says so."""

    def model(self) -> str:
        return "unknown"


@dataclass
class Noisy(Exact):
    """y = clip(f) + σ·n with σ known per sample (``clip``: a deterministic map before the noise, if any)."""

    kind: ClassVar[str] = "noise"
    changes_fit: ClassVar[bool] = True
    every_stage: ClassVar[bool] = True  # the noise propagates back through the stages

    sigma: torch.Tensor | None = None          # noise std per sample, broadcastable against y
    clip: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        assert self.sigma is not None
        y = self.observed  # σ relative to the clean features' RMS, per sample (B,)
        clean_rms = (y.flatten(1).pow(2).mean(dim=1) - self.sigma.flatten(1)[:, 0] ** 2).clamp_min(1e-30).sqrt()
        self.relative_noise = self.sigma.flatten(1)[:, 0] / clean_rms

    def data_loss(self, forward: Forward, pre_relu: Forward | None = None) -> Loss:
        clip = self.clip or (lambda f: f)
        return squared_error(lambda x: clip(forward(x)), self.observed)

    def stage_prior(self, target: torch.Tensor, x0: torch.Tensor) -> Loss | None:
        """Per sample s_b²·||y_b||² / ||x0_b||² times ||x - x0||²: a noisy target pulls less than a clean one."""
        energy = sum_per_sample(target.pow(2)) / sum_per_sample(x0.pow(2)).clamp_min(1e-30)
        weight = self.relative_noise ** 2 * energy
        return least_norm(weight.to(x0.dtype), centre=x0)

    def image_prior(self, tv_weight: float, tv_prior_rate: float) -> Loss | None:
        """The user's TV weight plus σ²·β·TV(x) per sample (a TV prior of rate β)."""
        return _sigma_tv(self.sigma, tv_weight, tv_prior_rate)

    def diagnostics(self) -> dict[str, Any]:
        assert self.sigma is not None
        return {**super().diagnostics(), "noise_sigma_mean": float(self.sigma.mean()),
                "relative_noise": float(self.relative_noise.mean())}


@dataclass
class Masked(Exact):
    """y = scale·f where ``mask`` (released), 0 elsewhere; ``threshold`` (top-k): unreleased |f| <= it."""

    kind: ClassVar[str] = "masked"
    changes_fit: ClassVar[bool] = True

    mask: torch.Tensor | None = None
    scale: float = 1.0
    threshold: torch.Tensor | None = None

    def data_loss(self, forward: Forward, pre_relu: Forward | None = None) -> Loss:
        assert self.mask is not None
        target = self.observed / self.scale
        if pre_relu is not None:
            return masked_error_through_relu(pre_relu, self.mask, target, self.threshold)
        return masked_error(forward, self.mask, target, self.threshold)

    def cut_target(self, target: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None
        return torch.where(self.mask, target / self.scale, torch.zeros_like(target))


@dataclass
class Quantized(Exact):
    """f within [``low``, ``high``] (its bin), y the bin's level; ``sigma`` the rounding error's std."""

    kind: ClassVar[str] = "quantized"
    changes_fit: ClassVar[bool] = True

    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    def data_loss(self, forward: Forward, pre_relu: Forward | None = None) -> Loss:
        assert self.low is not None and self.high is not None
        if pre_relu is not None:
            return binned_error_through_relu(pre_relu, self.observed, self.low, self.high, BIN_WEIGHT)
        return binned_error(forward, self.observed, self.low, self.high, BIN_WEIGHT)

    def image_prior(self, tv_weight: float, tv_prior_rate: float) -> Loss | None:
        return _sigma_tv(self.sigma, tv_weight, tv_prior_rate)

    def diagnostics(self) -> dict[str, Any]:
        out = super().diagnostics()
        if self.sigma is not None:
            out["noise_sigma_mean"] = float(self.sigma.mean())
        return out


def _sigma_tv(sigma: torch.Tensor | None, tv_weight: float, rate: float) -> Loss | None:
    """``(tv_weight + σ_b²·rate)·TV(x)`` per sample; the user's TV weight alone without σ or rate."""
    if sigma is None or rate <= 0:
        return tv_prior(tv_weight)
    weights = (sigma.flatten(1)[:, 0] ** 2) * rate  # per sample

    def prior(x: torch.Tensor) -> torch.Tensor:
        return (weights.to(x.dtype) + tv_weight) * total_variation(x)
    return prior
