"""Defense-aware PEEL: how the features PEEL observes relate to the client's true output, given the defense's
kind and public parameters, turned into the loss each fit minimises.

- noise (``gaussian_noise``, ``laplace_noise``, ``feature_dp``): MAP with the known noise level σ: each stage
  a Tikhonov-regularised least squares (weight s², s = σ relative to the features' RMS), the image a least
  squares plus σ²·β·TV(x) (a TV prior of rate β, so the prior's weight follows from σ²); the feature
  clipping of ``feature_dp`` is part of the forward model.
- masking (``pruning``, ``topk``, ``dropout``): a fit only on the released entries (dropout's survivors
  scaled back by 1-p); top-k's zeros also say ``|f| <= `` the smallest released magnitude.
- ``quantization``: the rounding error is uniform in each feature's bin. A pure within-bin fit (zero loss
  inside) left the image too free on 2-bit features (worse than plain PEEL at 16x16), so the data term is
  the squared distance to the bin centre (the Gaussian surrogate, std width/sqrt 12, which also weights
  the TV prior) plus ``BIN_WEIGHT`` x the squared distance outside the bin.
- ``none``: the exact fit of plain PEEL. Anything else: plain PEEL, and the diagnostics say so.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from attacks.optim import FitResult, fit_input, relu_violation
from attacks.peel.solver import warm_start
from attacks.peel.stages import Stage
from attacks.rmle import total_variation
from splitnn.batch import per_sample

Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor], torch.Tensor]

NOISE = ("gaussian_noise", "laplace_noise", "feature_dp")
MASKING = ("pruning", "topk", "dropout")
#: Quantization: weight of the squared distance outside a bin, against the squared distance to its centre.
BIN_WEIGHT = 10.0


@dataclass
class DefenseReading:
    """What the observed features ``y`` say about the clean features ``f(x)``, for one defense.

    ``kind``: ``exact`` (y = f), ``noise`` (y = clip(f) + σ·n), ``masked`` (y = scale·f where ``mask``),
    ``quantized`` (f within [``low``, ``high``]) or ``unknown`` (treated as exact).
    """

    defense: str
    kind: str
    note: str
    observed: torch.Tensor
    sigma: torch.Tensor | None = None          # noise std per sample, broadcastable against y
    relative_noise: float = 0.0                # σ relative to the clean features' RMS (mean over samples)
    clip: Callable[[torch.Tensor], torch.Tensor] | None = None
    mask: torch.Tensor | None = None           # released entries
    scale: float = 1.0                         # y = scale * f on released entries (dropout's 1/(1-p))
    threshold: torch.Tensor | None = None      # top-k: unreleased entries have |f| <= threshold
    low: torch.Tensor | None = None            # quantization bin of each entry
    high: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def changes_fit(self) -> bool:
        """Whether the fits differ from plain PEEL's."""
        return self.kind in ("noise", "masked", "quantized")

    def diagnostics(self) -> dict[str, Any]:
        out = {"defense": self.defense, "model": self.kind, "note": self.note, **self.extras}
        if self.sigma is not None:
            out["noise_sigma_mean"] = float(self.sigma.mean())
            out["relative_noise"] = self.relative_noise
        return out

    def data_loss(self, forward: Forward, pre_relu: Forward | None = None) -> Loss:
        """The data term for a fit whose output is the observed features: half a sum of squares.

        ``pre_relu`` (``forward`` without its final ReLU, when it has one) keeps the masked and quantized
        terms smooth: a released positive value or a bin above zero pins the pre-activation itself,
        whose gradient does not vanish while it is still negative.
        """
        y = self.observed
        if pre_relu is not None and self.kind in ("masked", "quantized"):
            return self._through_relu(pre_relu)
        if self.kind == "noise":
            clip = self.clip or (lambda f: f)
            return lambda x: 0.5 * (clip(forward(x)) - y).pow(2).sum()
        if self.kind == "masked":
            assert self.mask is not None
            released = self.mask
            target = y / self.scale

            def masked(x: torch.Tensor) -> torch.Tensor:
                f = forward(x)
                loss = 0.5 * torch.where(released, f - target, torch.zeros_like(f)).pow(2).sum()
                if self.threshold is not None:  # top-k: what was dropped was no larger than what was kept
                    excess = (f.abs() - self.threshold).clamp_min(0)
                    loss = loss + 0.5 * torch.where(released, torch.zeros_like(f), excess).pow(2).sum()
                return loss
            return masked
        if self.kind == "quantized":
            assert self.low is not None and self.high is not None
            low, high = self.low, self.high

            def within_bins(x: torch.Tensor) -> torch.Tensor:
                f = forward(x)
                outside = (low - f).clamp_min(0).pow(2).sum() + (f - high).clamp_min(0).pow(2).sum()
                return 0.5 * ((f - y).pow(2).sum() + BIN_WEIGHT * outside)
            return within_bins
        return lambda x: 0.5 * (forward(x) - y).pow(2).sum()

    def _through_relu(self, pre_relu: Forward) -> Loss:
        """The masked or quantized term on the pre-activation z of a ReLU output f = max(z, 0)."""
        if self.kind == "masked":
            assert self.mask is not None
            released, target, threshold = self.mask, self.observed / self.scale, self.threshold

            def masked(x: torch.Tensor) -> torch.Tensor:
                z = pre_relu(x)
                zero = torch.zeros_like(z)
                # a released zero of a ReLU output only says z <= 0 (e.g. in the channels pruning keeps)
                fit = torch.where(target > 0, z - target, z.clamp_min(0))
                loss = 0.5 * torch.where(released, fit, zero).pow(2).sum()
                if threshold is not None:  # f <= t  <=>  z <= t, for t >= 0
                    loss = loss + 0.5 * torch.where(released, zero, (z - threshold).clamp_min(0)).pow(2).sum()
                return loss
            return masked
        assert self.low is not None and self.high is not None
        low, high = self.low, self.high
        above_zero = low > 0  # a bin reaching down to zero also holds every z <= 0

        y = self.observed

        def within_bins(x: torch.Tensor) -> torch.Tensor:
            z = pre_relu(x)
            below = torch.where(above_zero, (low - z).clamp_min(0), torch.zeros_like(z))
            centre = torch.where(above_zero, z, z.clamp_min(0)) - y
            outside = below.pow(2).sum() + (z - high).clamp_min(0).pow(2).sum()
            return 0.5 * (centre.pow(2).sum() + BIN_WEIGHT * outside)
        return within_bins

    def image_prior(self, tv_weight: float, tv_prior: float) -> Loss | None:
        """The refinement's regulariser: the user's TV weight plus, for noise, σ²·β·TV(x) per sample."""
        if self.kind in ("noise", "quantized") and self.sigma is not None and tv_prior > 0:
            weights = (self.sigma.flatten(1)[:, 0] ** 2) * tv_prior  # per sample

            def prior(x: torch.Tensor) -> torch.Tensor:
                per_sample = torch.stack([total_variation(xi) for xi in x])
                return (weights.to(x.dtype) * per_sample).sum() + tv_weight * per_sample.sum()
            return prior
        return (lambda x: tv_weight * total_variation(x)) if tv_weight > 0 else None


def read_defense(defense: Any, observed: torch.Tensor) -> DefenseReading:
    """How ``observed`` came from the clean features, given ``defense`` (its name and public parameters)."""
    name = getattr(defense, "name", None) if defense is not None else "none"
    params = dict(getattr(defense, "params", {}) or {})
    y = observed
    if name == "none":
        return DefenseReading("none", "exact", "no defense: exact fit", y)
    if name in ("gaussian_noise", "laplace_noise"):
        scale = float(params["scale"])
        if scale == 0:
            return DefenseReading(name, "exact", "scale 0: exact fit", y)
        if params.get("relative", True):
            # E||y||² = ||f||²(1 + s²): the clean RMS follows from the observed one
            rms = y.flatten(1).pow(2).mean(dim=1).sqrt() / math.sqrt(1 + scale ** 2)
            sigma = per_sample(scale * rms, y)
        else:
            sigma = per_sample(torch.full_like(y.flatten(1)[:, 0], scale), y)
        return _noise(name, y, sigma, None, f"noise of std σ (scale {scale}): MAP with a TV prior")
    if name == "feature_dp":
        from defenses.noise import FeatureDP

        dp = defense if isinstance(defense, FeatureDP) else FeatureDP(**params)
        std = dp.noise_scale * (math.sqrt(2.0) if dp.mechanism == "laplace" else 1.0)
        if std == 0 and math.isinf(dp.clip):
            return DefenseReading(name, "exact", "epsilon inf, clip inf: exact fit", y)
        sigma = per_sample(torch.full_like(y.flatten(1)[:, 0], max(std, 1e-12)), y)
        return _noise(name, y, sigma, dp.clip_features, "clipped features plus calibrated noise: MAP with a "
                      "TV prior, clipping in the forward model")
    if name in MASKING:
        return _masking(name, defense, params, y)
    if name == "quantization":
        return _quantization(params, y)
    return DefenseReading(str(name), "unknown", f"no model of defense {name!r}: plain PEEL", y)


def _noise(name: str, y: torch.Tensor, sigma: torch.Tensor, clip: Callable | None, note: str) -> DefenseReading:
    clean_rms = (y.flatten(1).pow(2).mean(dim=1) - sigma.flatten(1)[:, 0] ** 2).clamp_min(1e-30).sqrt()
    relative = float((sigma.flatten(1)[:, 0] / clean_rms).mean())
    return DefenseReading(name, "noise", note, y, sigma=sigma, relative_noise=relative, clip=clip)


def _masking(name: str, defense: Any, params: dict[str, Any], y: torch.Tensor) -> DefenseReading:
    if name == "pruning":
        removed = getattr(defense, "removed", None)
        if removed is None:  # not fitted here: the pruned channels are the ones that are zero in every sample
            removed = [c for c in range(y.shape[1]) if not bool(y[:, c].ne(0).any())]
        if not removed:
            return DefenseReading(name, "exact", "no channel pruned: exact fit", y)
        mask = torch.ones_like(y, dtype=torch.bool)
        mask[:, removed] = False
        return DefenseReading(name, "masked", f"fit on the {y.shape[1] - len(removed)} released channels", y,
                              mask=mask, extras={"removed_channels": len(removed)})
    mask = y.ne(0)
    if name == "topk":
        if float(params.get("keep", 1.0)) >= 1.0:
            return DefenseReading(name, "exact", "keep 1: exact fit", y)
        flat = y.flatten(1).abs()
        smallest = torch.where(flat > 0, flat, torch.full_like(flat, math.inf)).amin(dim=1)
        return DefenseReading(name, "masked", "fit on the released entries; the zeroed ones are at most the "
                              "smallest released magnitude", y, mask=mask, threshold=per_sample(smallest, y))
    p = float(params.get("p", 0.0))
    if p == 0:
        return DefenseReading(name, "exact", "p 0: exact fit", y)
    scale = 1.0 / (1.0 - p) if params.get("rescale", True) else 1.0
    return DefenseReading(name, "masked", "fit on the surviving entries, scaled back by 1-p", y, mask=mask,
                          scale=scale)


def _quantization(params: dict[str, Any], y: torch.Tensor) -> DefenseReading:
    bits = params.get("bits")
    if bits is None:
        return DefenseReading("quantization", "exact", "bits null: exact fit", y)
    steps = 2.0 ** int(bits) - 1
    if params.get("range", "sample") == "fixed":
        lo, hi = float(params["low"]), float(params["high"])
        half = torch.full_like(y, 0.5 * (hi - lo) / steps)
        low, high = y - half, y + half
        low = torch.where(y <= lo, torch.full_like(y, -math.inf), low)   # clamped from below: anything <= lo
        high = torch.where(y >= hi, torch.full_like(y, math.inf), high)
    else:  # each sample's min and max are levels 0 and 2^bits - 1, so the observed range is the true one
        flat = y.flatten(1)
        width = flat.amax(dim=1) - flat.amin(dim=1)
        half = per_sample(0.5 * width / steps, y)
        low, high = y - half, y + half
    # The rounding error is uniform in the bin (std width/sqrt(12)): the TV prior's weight follows from it.
    sigma = per_sample((high - low).flatten(1).amin(dim=1) / math.sqrt(12.0), y)
    note = (f"{bits}-bit bins: distance to the bin centre plus a penalty outside the bin, TV prior weighted by the "
            "rounding error's variance")
    return DefenseReading("quantization", "quantized", note, y, low=low, high=high, sigma=sigma)


# ---------------------------------------------------------------- the fits

def invert_stage_adaptive(stage: Stage, target: torch.Tensor, reading: DefenseReading, *, at_cut: bool,
                          lower: float | None, upper: float | None, max_iter: int
                          ) -> tuple[torch.Tensor, dict[str, Any]]:
    """One stage under the reading: at the cut, the defense's data term from a warm start on the released
    values; behind a noisy cut, a least squares pulled toward the warm start with weight s² (noise
    propagates back through the stages)."""
    start = time.perf_counter()
    seen = target  # noise: the noisy values; quantization: the bin centres
    if at_cut and reading.kind == "masked":
        assert reading.mask is not None
        seen = torch.where(reading.mask, target / reading.scale, torch.zeros_like(target))
    x0 = warm_start(stage, seen, lower, upper)
    if at_cut:  # the target is the observed features themselves
        data_loss = reading.data_loss(stage.forward, stage.pre_relu)
    else:
        data_loss = lambda x: 0.5 * (stage.forward(x) - target).pow(2).sum()  # noqa: E731
    regulariser = None
    if reading.kind == "noise":
        weight = reading.relative_noise ** 2 * float(target.pow(2).sum()) / max(float(x0.pow(2).sum()), 1e-30)
        regulariser = lambda v: 0.5 * weight * (v - x0).pow(2).sum()  # noqa: E731
    fit = fit_input(stage.forward, target, x0, lower=lower, upper=upper, max_iter=max_iter, data_loss=data_loss,
                    regulariser=regulariser)
    return fit.x, {"stage": stage.name, "kind": "adaptive " + reading.kind, "fixed_point_iterations": 0,
                   "lbfgs_iterations": fit.iterations, "residual": fit.residual,
                   "constraint_violation": relu_violation(stage.pre_relu, fit.x, seen) if stage.pre_relu else 0.0,
                   "seconds": time.perf_counter() - start}


def objective(loss: Loss, prior: Loss | None, x: torch.Tensor) -> float:
    """The refinement's objective at ``x`` (data term plus prior): what picks between fits under a defense,
    since the bare residual rewards fitting the noise."""
    with torch.no_grad():
        value = loss(x)
        if prior is not None:
            value = value + prior(x)
    return float(value)


def fit_image_adaptive(stages: list[Stage], reading: DefenseReading, start: torch.Tensor, iterations: int,
                       tv_weight: float, tv_prior: float) -> tuple[FitResult, float]:
    """End-to-end fit of the image through every stage under the reading; returns the fit and its objective."""
    forward, head = _chain(stages), _chain(stages[:-1])
    last = stages[-1].pre_relu
    pre_relu = (lambda x: last(head(x))) if last is not None else None
    prior = reading.image_prior(tv_weight, tv_prior)
    loss = reading.data_loss(forward, pre_relu)
    fit = fit_input(forward, reading.observed, start, lower=0.0, upper=1.0, max_iter=iterations,
                    regulariser=prior, data_loss=loss)
    return fit, objective(loss, prior, fit.x)


def _chain(stages: list[Stage]) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = stage.forward(x)
        return x
    return forward
