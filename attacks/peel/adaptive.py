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

The attacker reads a ``PublicDefense`` (name, kind, public parameters), never the defense object and its
random state. Every data term and prior gives one value per sample, so each sample is fitted on its own.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from attacks.base import PublicDefense
from attacks.optim import END_TO_END_HISTORY, MultiStartFit, fit_from_starts, fit_input
from attacks.peel.chain import chain
from attacks.peel.solver import warm_start
from attacks.peel.stages import Stage
from attacks.priors import (Forward, Loss, combined, least_norm, relu_violation, squared_error, sum_per_sample,
                            total_variation)
from defenses.noise import FeatureDP
from splitnn.batch import per_sample

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
    relative_noise: torch.Tensor | None = None  # per sample (B,): σ relative to the clean features' RMS
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
        if self.relative_noise is not None:
            out["relative_noise"] = float(self.relative_noise.mean())
        return out

    def data_loss(self, forward: Forward, pre_relu: Forward | None = None) -> Loss:
        """The data term for a fit whose output is the observed features: half a sum of squares per sample.

        ``pre_relu`` (``forward`` without its final ReLU, when it has one) keeps the masked and quantized
        terms smooth: a released positive value or a bin above zero pins the pre-activation itself,
        whose gradient does not vanish while it is still negative.
        """
        y = self.observed
        if pre_relu is not None and self.kind in ("masked", "quantized"):
            return self._through_relu(pre_relu)
        if self.kind == "noise":
            clip = self.clip or (lambda f: f)
            return squared_error(lambda x: clip(forward(x)), y)
        if self.kind == "masked":
            assert self.mask is not None
            released = self.mask
            target = y / self.scale

            def masked(x: torch.Tensor) -> torch.Tensor:
                f = forward(x)
                loss = 0.5 * sum_per_sample(torch.where(released, f - target, torch.zeros_like(f)).pow(2))
                if self.threshold is not None:  # top-k: what was dropped was no larger than what was kept
                    excess = (f.abs() - self.threshold).clamp_min(0)
                    loss = loss + 0.5 * sum_per_sample(torch.where(released, torch.zeros_like(f), excess).pow(2))
                return loss
            return masked
        if self.kind == "quantized":
            assert self.low is not None and self.high is not None
            low, high = self.low, self.high

            def within_bins(x: torch.Tensor) -> torch.Tensor:
                f = forward(x)
                outside = sum_per_sample((low - f).clamp_min(0).pow(2) + (f - high).clamp_min(0).pow(2))
                return 0.5 * (sum_per_sample((f - y).pow(2)) + BIN_WEIGHT * outside)
            return within_bins
        return squared_error(forward, y)

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
                loss = 0.5 * sum_per_sample(torch.where(released, fit, zero).pow(2))
                if threshold is not None:  # f <= t  <=>  z <= t, for t >= 0
                    loss = loss + 0.5 * sum_per_sample(torch.where(released, zero, (z - threshold).clamp_min(0)).pow(2))
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
            outside = sum_per_sample(below.pow(2) + (z - high).clamp_min(0).pow(2))
            return 0.5 * (sum_per_sample(centre.pow(2)) + BIN_WEIGHT * outside)
        return within_bins

    def image_prior(self, tv_weight: float, tv_prior: float) -> Loss | None:
        """The refinement's regulariser: the user's TV weight plus, for noise, σ²·β·TV(x) per sample."""
        if self.kind in ("noise", "quantized") and self.sigma is not None and tv_prior > 0:
            weights = (self.sigma.flatten(1)[:, 0] ** 2) * tv_prior  # per sample

            def prior(x: torch.Tensor) -> torch.Tensor:
                return (weights.to(x.dtype) + tv_weight) * total_variation(x)
            return prior
        return (lambda x: tv_weight * total_variation(x)) if tv_weight > 0 else None


def read_defense(defense: PublicDefense, observed: torch.Tensor) -> DefenseReading:
    """How ``observed`` came from the clean features, given the defense's name and public parameters.

    A Defense object is refused (use ``PublicDefense.of(defense)``): its random state is not public.
    """
    if not isinstance(defense, PublicDefense):
        raise TypeError(f"read_defense needs a PublicDefense (PublicDefense.of(defense)), not "
                        f"{type(defense).__name__}: a defense-aware attacker knows the defense's kind and public "
                        "parameters, never its random state")
    name, params, y = defense.name, dict(defense.params), observed
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
    if name == "feature_dp":  # rebuilt from its public parameters, for its deterministic clipping and noise scale
        dp = FeatureDP(**params)
        std = dp.noise_scale * (math.sqrt(2.0) if dp.mechanism == "laplace" else 1.0)
        if std == 0 and math.isinf(dp.clip):
            return DefenseReading(name, "exact", "epsilon inf, clip inf: exact fit", y)
        sigma = per_sample(torch.full_like(y.flatten(1)[:, 0], max(std, 1e-12)), y)
        return _noise(name, y, sigma, dp.clip_features, "clipped features plus calibrated noise: MAP with a "
                      "TV prior, clipping in the forward model")
    if name in MASKING:
        return _masking(name, params, y)
    if name == "quantization":
        return _quantization(params, y)
    return DefenseReading(str(name), "unknown", f"no model of defense {name!r}: plain PEEL", y)


def _noise(name: str, y: torch.Tensor, sigma: torch.Tensor, clip: Callable | None, note: str) -> DefenseReading:
    clean_rms = (y.flatten(1).pow(2).mean(dim=1) - sigma.flatten(1)[:, 0] ** 2).clamp_min(1e-30).sqrt()
    relative = sigma.flatten(1)[:, 0] / clean_rms
    return DefenseReading(name, "noise", note, y, sigma=sigma, relative_noise=relative, clip=clip)


def _masking(name: str, params: dict[str, Any], y: torch.Tensor) -> DefenseReading:
    if name == "pruning":
        # The pruned channels are not public (the defense chose them on training data); in the observation they
        # are zero throughout. Read per sample (a channel zero in the whole sample), so samples stay independent.
        if int(float(params.get("ratio", 0.0)) * y.shape[1]) == 0:  # as many channels as the defense removes
            return DefenseReading(name, "exact", "no channel pruned: exact fit", y)
        released = y.flatten(2).ne(0).any(dim=2) if y.dim() > 2 else y.ne(0)   # (B, C)
        mask = released.view(*released.shape, *([1] * (y.dim() - 2))).expand_as(y)
        return DefenseReading(name, "masked", "fit on the channels not zero throughout the sample", y, mask=mask,
                              extras={"removed_channels": float((~released).sum(dim=1).double().mean())})
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
        data_loss = squared_error(stage.forward, target)
    regulariser = None
    if reading.kind == "noise" and reading.relative_noise is not None:  # per sample: s_b²·||y_b||² / ||x0_b||²
        energy = sum_per_sample(target.pow(2)) / sum_per_sample(x0.pow(2)).clamp_min(1e-30)
        weight = reading.relative_noise ** 2 * energy
        regulariser = least_norm(weight.to(x0.dtype), centre=x0)
    fit = fit_input(stage.forward, target, x0, lower=lower, upper=upper, max_iter=max_iter, data_loss=data_loss,
                    regulariser=regulariser)
    return fit.x, {"stage": stage.name, "kind": "adaptive " + reading.kind, "fixed_point_iterations": 0,
                   "lbfgs_iterations": int(fit.iterations.max()), "evaluations": fit.evaluations.tolist(),
                   "residual": fit.residual,
                   "constraint_violation": relu_violation(stage.pre_relu, fit.x, seen) if stage.pre_relu else 0.0,
                   "seconds": time.perf_counter() - start}


def refine_adaptive(stages: list[Stage], reading: DefenseReading, starts: dict[str, torch.Tensor], *,
                    iterations: int, tv_weight: float, tv_prior: float, max_evals: int | None = None,
                    max_seconds: float | None = None) -> MultiStartFit:
    """End-to-end fits of the image through every stage under the reading, one per start; per sample the fit
    with the lower objective (data term plus prior) wins, since the bare residual rewards fitting the noise."""
    forward, head = chain(stages), chain(stages[:-1])
    last = stages[-1].pre_relu
    pre_relu = (lambda x: last(head(x))) if last is not None else None
    prior = reading.image_prior(tv_weight, tv_prior)
    loss = reading.data_loss(forward, pre_relu)
    return fit_from_starts(forward, reading.observed, starts, score=combined(loss, prior), max_evals=max_evals,
                           max_seconds=max_seconds, lower=0.0, upper=1.0, max_iter=iterations, regulariser=prior,
                           data_loss=loss, history=END_TO_END_HISTORY)
