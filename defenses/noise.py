"""Noise injection at the cut: Gaussian and Laplace noise of a given scale, and feature-level DP
(clip each sample's feature vector, then add noise calibrated to a requested (epsilon, delta))."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
from pydantic import Field

from leakbench.defenses.base import FeatureDefense
from leakbench.defenses.registry import register
from leakbench.splitnn.batch import per_sample
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.params import NonNegative, Seed


@dataclass(frozen=True)
class NoiseLaw:
    """How a noise defense releases features, for Fisher-information bounds (``evaluation.dfil``): the release is
    ``mean(f) + std(f) * e``, where ``e`` is i.i.d. per coordinate, zero-mean, unit-variance and symmetric.

    ``mean`` and ``std`` are differentiable functions of the features ``f`` (``std`` per sample, broadcastable
    against them; it depends on ``f`` for noise relative to the features' scale). ``location_information`` is the
    Fisher information of ``e``'s density p about a shift (the integral of p'^2 / p), ``scale_information`` that of
    (1/s) p(e/s) about s at s = 1. Per coordinate k the release then carries ``location_information * |grad
    mean_k|^2 / std_k^2 + scale_information * |grad std_k|^2 / std_k^2`` (no cross term: p is symmetric).
    """

    mean: Callable[[torch.Tensor], torch.Tensor]
    std: Callable[[torch.Tensor], torch.Tensor]
    location_information: float
    scale_information: float


#: (location, scale) Fisher information of unit-variance noise: N(0, 1) gives 1 and 2; Laplace(0, 1/sqrt 2), 1/b^2
#: = 2 and 1 (Gaussian noise has the least location information of any law of that variance).
GAUSSIAN_INFORMATION = (1.0, 2.0)
LAPLACE_INFORMATION = (2.0, 1.0)


@register("none")
class NoDefense(FeatureDefense):
    """The undefended baseline: features pass unchanged."""

    baseline = True
    strength_zero = {}

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _ScaledNoise(FeatureDefense):
    """Zero-mean noise with standard deviation ``scale`` (absolute) or ``scale`` x each sample's feature RMS."""

    strength_zero = {"scale": 0.0}

    #: The unit noise's (location, scale) Fisher information (``NoiseLaw``).
    information: ClassVar[tuple[float, float]]

    def __init__(self, scale: NonNegative = 0.1, relative: bool = True, seed: Seed = 0):
        super().__init__(seed)
        self.scale, self.relative = scale, relative

    def noise_law(self) -> NoiseLaw | None:
        """The features plus ``sigma(features)`` times unit noise; None at scale 0 (no noise). Relative noise's
        sigma depends on the features, so its law carries that dependence (the scale term of ``NoiseLaw``)."""
        if self.scale == 0:
            return None
        return NoiseLaw(lambda features: features, self.sigma, *self.information)

    def sigma(self, features: torch.Tensor) -> torch.Tensor:
        """Per-sample noise standard deviation, shaped to broadcast against ``features``."""
        if not self.relative:
            return torch.full((features.shape[0],) + (1,) * (features.dim() - 1), self.scale,
                              dtype=features.dtype, device=features.device)
        rms = features.flatten(1).pow(2).mean(dim=1).sqrt()
        return per_sample(self.scale * rms, features)

    def unit_noise(self, features: torch.Tensor) -> torch.Tensor:
        """Noise of standard deviation 1, from the seeded stream."""
        raise NotImplementedError

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return features
        return features + self.sigma(features) * self.unit_noise(features)


@register("gaussian_noise")
class GaussianNoise(_ScaledNoise):
    """Adds N(0, sigma^2) to every feature.

    ``sigma = scale`` when ``relative`` is false; otherwise ``sigma = scale * RMS`` of each
    sample's own features, so one ``scale`` means the same signal-to-noise ratio at any cut.
    """

    information = GAUSSIAN_INFORMATION

    def unit_noise(self, features: torch.Tensor) -> torch.Tensor:
        return torch.randn(features.shape, generator=self.generator(features.device),
                           dtype=features.dtype, device=features.device)


def laplace(shape: torch.Size, b: float | torch.Tensor, generator: torch.Generator, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """Seeded Laplace(0, b) samples: the difference of two Exp(1) draws, times ``b``."""
    e = torch.empty((2, *shape), dtype=dtype, device=device).exponential_(generator=generator)
    return b * (e[0] - e[1])


@register("laplace_noise")
class LaplaceNoise(_ScaledNoise):
    """Adds Laplace noise to every feature; ``scale`` is its standard deviation (b = scale / sqrt 2),
    absolute or relative to each sample's feature RMS, so it matches ``gaussian_noise`` in noise power."""

    information = LAPLACE_INFORMATION

    def unit_noise(self, features: torch.Tensor) -> torch.Tensor:
        return laplace(features.shape, 1.0 / math.sqrt(2.0), self.generator(features.device),
                       features.dtype, features.device)


# ---------------------------------------------------------------- feature-level differential privacy

def classic_gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Dwork & Roth (Thm A.1): sigma = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon, valid for epsilon <= 1."""
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm 8)."""
    from scipy.special import log_ndtr

    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return float(math.exp(log_ndtr(a - b)) - math.exp(epsilon + log_ndtr(-a - b)))


def analytic_gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """The smallest sigma whose exact delta at ``epsilon`` is <= ``delta`` (analytic Gaussian mechanism,
    Balle & Wang 2018), found by bisection on the monotone delta(sigma); valid for every epsilon > 0."""
    lo, hi = 1e-12 * sensitivity, sensitivity
    while gaussian_delta(hi, sensitivity, epsilon) > delta:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, sensitivity, epsilon) > delta:
            lo = mid
        else:
            hi = mid
    return hi  # delta(hi) <= delta always holds, so the guarantee is never overstated


@register("feature_dp")
class FeatureDP(FeatureDefense):
    """Each sample's flattened feature vector is clipped to norm ``clip`` (L2 for Gaussian, L1 for
    Laplace), then noise calibrated to (epsilon, delta) is added: one release of one feature vector
    is (epsilon, delta)-DP with respect to the client's input (any two inputs are neighbours).

    The sensitivity is the diameter of the clip ball, ``2 * clip``. Gaussian: ``calibration`` is
    ``analytic`` (Balle & Wang 2018, any epsilon) or ``classic`` (Dwork & Roth, epsilon <= 1).
    Laplace: b = 2 * clip / epsilon, delta = 0. ``delta`` defaults to 1e-5 (Gaussian) or 0 (Laplace).
    ``epsilon = inf`` with ``clip = inf`` is the identity (strength 0).
    """

    guarantee_type = "(epsilon, delta)-DP per released feature vector (local DP of the client's input)"
    strength_zero = {"epsilon": math.inf, "clip": math.inf}

    def __init__(self, epsilon: Annotated[float, Field(gt=0, allow_inf_nan=True)] = 1.0,
                 delta: Annotated[float, Field(ge=0, lt=1)] | None = None,
                 clip: Annotated[float, Field(gt=0, allow_inf_nan=True)] = 1.0,
                 mechanism: Literal["gaussian", "laplace"] = "gaussian",
                 calibration: Literal["analytic", "classic"] = "analytic", seed: Seed = 0):
        super().__init__(seed)
        self.mechanism, self.calibration, self.epsilon, self.clip = mechanism, calibration, epsilon, clip
        if math.isnan(epsilon) or math.isnan(clip):
            raise ParameterError("epsilon" if math.isnan(epsilon) else "clip", float("nan"), "a number > 0")
        if delta is None:  # the default: 1e-5 for Gaussian, 0 for Laplace
            delta = 1e-5 if self.mechanism == "gaussian" else 0.0
        self.delta = float(delta)
        if self.mechanism == "gaussian" and self.delta == 0:
            raise ParameterError("delta", delta, "a number > 0 and < 1 for the Gaussian mechanism")
        if self.mechanism == "laplace" and self.delta != 0:
            raise ParameterError("delta", delta, "0 for the Laplace mechanism (it is pure epsilon-DP)")
        if math.isinf(self.clip) and not math.isinf(self.epsilon):
            raise ParameterError("clip", clip, "a finite bound when epsilon is finite (the noise must be calibrated "
                                               "to a bounded sensitivity)")
        if (self.mechanism == "gaussian" and self.calibration == "classic" and self.epsilon > 1
                and not math.isinf(self.epsilon)):
            raise ParameterError("epsilon", epsilon, "<= 1 for the classic Gaussian calibration "
                                                     "(use calibration: analytic for larger epsilon)")
        self.noise_scale = self._noise_scale()

    @property
    def sensitivity(self) -> float:
        """L2 (Gaussian) or L1 (Laplace) distance between any two clipped feature vectors, at most."""
        return 2.0 * self.clip

    def _noise_scale(self) -> float:
        """Gaussian sigma or Laplace b; 0 when epsilon is infinite (no privacy, no noise)."""
        if math.isinf(self.epsilon):
            return 0.0
        if self.mechanism == "laplace":
            return self.sensitivity / self.epsilon
        if self.calibration == "classic":
            return classic_gaussian_sigma(self.sensitivity, self.epsilon, self.delta)
        return analytic_gaussian_sigma(self.sensitivity, self.epsilon, self.delta)

    def guarantee(self) -> dict[str, Any]:
        mechanism = "laplace" if self.mechanism == "laplace" else f"gaussian ({self.calibration})"
        return {"epsilon": self.epsilon, "delta": self.delta, "mechanism": mechanism,
                "norm": "L1" if self.mechanism == "laplace" else "L2", "clip": self.clip,
                "noise_scale": self.noise_scale, "unit": "per released feature vector"}

    def noise_law(self) -> NoiseLaw | None:
        """The clipped features plus noise of a fixed std (sigma, or sqrt(2) b for Laplace); None when epsilon is
        infinite (no noise)."""
        if self.noise_scale == 0:
            return None
        std = self.noise_scale * (math.sqrt(2.0) if self.mechanism == "laplace" else 1.0)
        information = LAPLACE_INFORMATION if self.mechanism == "laplace" else GAUSSIAN_INFORMATION
        return NoiseLaw(self.clip_features, lambda features: torch.full(
            (features.shape[0],) + (1,) * (features.dim() - 1), std, dtype=features.dtype, device=features.device),
            *information)

    def clip_features(self, features: torch.Tensor) -> torch.Tensor:
        """Scale each sample's flattened features down to norm <= ``clip`` (unchanged when already inside)."""
        if math.isinf(self.clip):
            return features
        flat = features.flatten(1)
        norms = flat.abs().sum(dim=1) if self.mechanism == "laplace" else flat.norm(dim=1)
        factor = (self.clip / norms.clamp_min(1e-30)).clamp(max=1.0)
        return features * per_sample(factor, features)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        clipped = self.clip_features(features)
        if self.noise_scale == 0:
            return clipped
        g = self.generator(features.device)
        if self.mechanism == "laplace":
            noise = laplace(features.shape, self.noise_scale, g, features.dtype, features.device)
        else:
            noise = self.noise_scale * torch.randn(features.shape, generator=g, dtype=features.dtype,
                                                   device=features.device)
        return clipped + noise
