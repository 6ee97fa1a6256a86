"""PEEL with a learned prior (``peel_prior``): the inverse network's decoder gives the start and a Gaussian prior,
PEEL's end-to-end fit (defense-aware when the defense is known) refines it against the observed features.

The decoder (``attacks.inverse_net``) reads noisy features far better than any fit through the client, while the
fit recovers what the decoder blurs when the features are clean or only masked. The MAP objective per sample is

    data(x) + prior(x) + 0.5 · (σ² / τ²) · ||x - decoder(y)||²

with ``data`` and ``prior`` the observation model's data term and TV prior (``attacks.peel.observation``), σ the
defense's noise std (known to a defense-aware attacker; 0 for an exact or masked release) and τ² the decoder's
mean squared error per pixel on auxiliary images. Multiplying a Gaussian likelihood ||f(x) - y||² / 2σ² and a
Gaussian prior ||x - d||² / 2τ² by σ² gives that weight, so the weight follows the noise: where the release is exact
the fit trusts the features, and the noisier they are the closer it stays to the decoder (``prior_scale``
rescales it; its default was chosen on the validation slice).

σ is the reader's (``attacks.peel.readers``) where the defense has a noise model. Where the reader says the
release is exact, or has no model of the defense, while the queries on auxiliary images show it departs from
the client's own features (``vib``'s noise, a secret ``random_projection``), the departure's measured relative
power r² is read as noise of that power (``measured_noise``): the fit then stays near the decoder as far as the
features through the known client fail to describe the release.

The per-sample objective cannot tell when the fit through the client moves the decoder's image the wrong way:
under heavy noise the features say little, and behind a secret map the client describes the release only up to
that map. So where the reading weights the prior (any noise, read or measured), the reconstruction is the blend

    decoder(y) + α · (fit - decoder(y)),   α in [0, 1],

with α the closed-form least-squares choice on ``calibration`` auxiliary images, attacked exactly as the target
is (their released features from the query that measured τ², the same reading, starts and fit) and scored
against their known truth. α = 1 keeps the fit, α = 0 the decoder's image. Where the reading weights no prior
(an exact or masked release) the features pin the fit down and α is 1 without calibrating. The auxiliary images
are the decoder's training images; on 16x16 digits at layer1 (the test harness's split) its MSE there is within
5% of that on test images (0.00149 against 0.00151 under Gaussian noise 0.5, 0.00035 against 0.00037
undefended), so they stand in for unseen images. The
calibration is a per-cell setup cost, like the decoder's training: it is cached with the cell's key (every chunk
blends alike), and its evaluations are recorded in ``diagnostics["calibration"]``, not in the per-sample budget.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks.cache import cached_module
from leakbench.attacks.base import Attack, AttackContext, Dtype, Evaluations, Knowledge, Reconstruction, budget
from leakbench.attacks.inverse_net import InverseNet
from leakbench.attacks.optim import END_TO_END_HISTORY, MultiStartFit, fit_from_starts, relative_residual
from leakbench.attacks.peel.attack import PEEL
from leakbench.attacks.peel.chain import chain, end_to_end_loss, pre_relu_forward
from leakbench.attacks.peel.observation import Exact, Noisy
from leakbench.attacks.peel.readers import read_defense
from leakbench.attacks.peel.stages import Stage, extract_stages
from leakbench.attacks.priors import combined, least_norm
from leakbench.attacks.registry import register
from leakbench.splitnn.batch import per_sample
from leakbench.splitnn.params import Count, NonNegative, Positive, PositiveCount, Seconds, Seed

#: Auxiliary images on which the decoder's error τ² and the release's mismatch are measured (fresh queries).
PRIOR_SAMPLES = 256
#: Auxiliary images on which the blend toward the decoder is calibrated (``calibration``'s default).
CALIBRATION_IMAGES = 8
#: A relative mismatch power below this is float rounding of an exact release (float32 features: ~1e-14).
MISMATCH_TOLERANCE = 1e-8


@register("peel_prior")
class PEELPrior(Attack):
    """The hybrid attacker: a decoder trained on auxiliary data through query access (the same decoder, and the
    same cache entry, as ``inverse_net`` with these decoder parameters) starts an end-to-end fit of the image
    through the client, pulled toward the decoder's image by the MAP weight σ²/τ² (module docstring).

    Starts: the decoder's image and, with ``blockwise``, PEEL's block-wise image; per sample the fit with the
    lower objective wins (no ground truth). ``adaptive`` (default) reads the defense as defense-aware PEEL does;
    ``adaptive: false`` fits the features exactly (σ = 0), so the decoder is only the start. ``prior_scale``
    multiplies the MAP weight (1 is the Gaussian MAP). ``prior_scale`` 0.1 with ``calibration`` 8 was chosen by
    ``benchmarks/tune_attacks.py --attacks peel_prior --budget 200 --images 16`` on the validation slice, which no
    experiment reports (mean 36.38 dB over undefended and relative Gaussian noise 0.1 and 0.5; without
    calibration 36.19; the MAP weight 1.0: 36.18 with or without, where α is 1). ``tv_weight`` 0 was chosen
    before calibration existed (PEEL's TV weight 0.3: 31.0 against 39.8 on the first two settings, since TV pulls
    an exact fit from a good start away from the truth). ``tv_weight``, ``tv_prior``, ``max_iter`` and
    ``refine_iter`` mean what they mean for PEEL; ``hidden``, ``epochs``, ``lr``, ``batch_size`` and ``seed``
    what they mean for ``inverse_net``. ``max_evaluations`` caps the refinement's end-to-end evaluations per
    sample (split across its starts) and ``max_seconds`` the whole attack after the decoder is trained and
    the blend calibrated. ``calibration`` is how many auxiliary images choose the blend toward the decoder
    (module docstring; 0: the fit as it is). ``alternatives`` holds the decoder's image, the block-wise image
    and the unblended fit.

    Knowledge: client weights, auxiliary data, query access, and the defense when ``adaptive``.
    """

    base_knowledge = frozenset({Knowledge.CLIENT_WEIGHTS, Knowledge.AUXILIARY_DATA, Knowledge.QUERY_ACCESS})
    reports_block_errors = True
    #: one decoder pass and one fit per sample; τ² and α come from auxiliary images, never from the batch
    batch_independent = True

    def __init__(self, adaptive: bool = True, prior_scale: NonNegative = 0.1, blockwise: bool = True,
                 max_iter: Count = 50, refine_iter: Count = 300, tv_weight: NonNegative = 0.0,
                 tv_prior: NonNegative = 5.0, hidden: PositiveCount = 64, epochs: Count = 15, lr: Positive = 5e-3,
                 batch_size: PositiveCount = 32, seed: Seed = 0, dtype: Dtype = "float32",
                 max_evaluations: Evaluations | None = None, max_seconds: Seconds | None = None,
                 calibration: Count = CALIBRATION_IMAGES):
        self.adaptive, self.prior_scale, self.blockwise = adaptive, prior_scale, blockwise
        self.max_iter, self.refine_iter, self.tv_weight, self.tv_prior = max_iter, refine_iter, tv_weight, tv_prior
        self.hidden, self.epochs, self.lr, self.batch_size, self.seed = hidden, epochs, lr, batch_size, seed
        self.dtype, self.max_evaluations, self.max_seconds = dtype, max_evaluations, max_seconds
        self.calibration = calibration

    @property
    def knowledge(self) -> frozenset[Knowledge]:
        return self.base_knowledge | ({Knowledge.DEFENSE} if self.adaptive else frozenset())

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        return self._peel().supports(client, defense)

    def _peel(self) -> PEEL:
        """The PEEL whose block-wise stage gives the second start."""
        return PEEL(max_iter=self.max_iter, refine=False, adaptive=self.adaptive, tv_prior=self.tv_prior,
                    dtype=self.dtype)

    def _decoder(self) -> InverseNet:
        return InverseNet(hidden=self.hidden, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                          seed=self.seed)

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        shape = context.require("image_shape", by=self)
        (aux_images, _labels), query = context.require("auxiliary", "query", by=self)
        defense = context.require("defense", by=self) if self.adaptive else None
        dtype = getattr(torch, self.dtype)
        inverse = self._decoder()
        decoder, from_cache, losses = inverse.fitted_decoder(features, context)
        start = time.perf_counter()  # the refinement's budget starts after training, as the decoder is reusable
        sample = aux_images[:PRIOR_SAMPLES]  # a tensor, also from a lazy set
        with torch.no_grad():
            released = query(sample)  # one fresh query serves τ², the mismatch and the calibration
            tau2 = decoder_error(decoder, sample, released)
        mismatch = release_mismatch(client, sample, released) if defense is not None else None
        stages = extract_stages(client, shape, dtype)

        def reading_of(observed: torch.Tensor) -> Exact:
            observed = observed.detach().to(dtype)
            if defense is None or mismatch is None:  # not adaptive: the features fitted exactly
                return Exact(observed)
            return measured_noise(read_defense(defense, observed), mismatch)

        def attack(reading: Exact, left: float | None) -> Attempt:
            return self._attempt(stages, decoder, reading, tau2, left)

        target = reading_of(features)
        weighted = bool(noise_variance(target).gt(0).any())
        calibrating = time.perf_counter()
        shrinkage, from_cache_alpha = self._shrinkage(features, context, lambda y: attack(reading_of(y), None),
                                                      sample, released) if weighted \
            else (Shrinkage(features.device), False)
        start += time.perf_counter() - calibrating  # set-up, as training is: outside the attack's budget
        left = None if self.max_seconds is None else max(self.max_seconds - (time.perf_counter() - start), 0.0)
        run = attack(target, left)
        fit, decoded, observed = run.fit, run.starts["decoder"], run.reading.observed
        alpha = float(shrinkage.alpha)
        images = fit.x if alpha == 1.0 else (decoded + alpha * (fit.x - decoded)).clamp(0.0, 1.0)
        forward = chain(stages)
        seconds = time.perf_counter() - start
        diagnostics: dict[str, Any] = {
            "decoder_from_cache": from_cache, "decoder_train_losses": losses, "decoder_mse": tau2,
            "release_mismatch": mismatch, "auxiliary_images": len(aux_images),
            "calibration": shrinkage.diagnostics(from_cache_alpha) if weighted else None,
            "adaptive": run.reading.diagnostics() if self.adaptive else None,
            "prior_weight_mean": float(run.weight.mean()),
            "refine_start": fit.chosen, "refine_objectives": {k: float(v.mean()) for k, v in fit.scores.items()},
            "decoder_residual": relative_residual(forward, decoded, observed),
            "refined_residual": relative_residual(forward, fit.x, observed),
            "iterations": int(fit.iterations.max()), "seconds": seconds,
            "budget": budget(seconds, fit.iterations, fit.evaluations, run.blockwise_evaluations)}
        if run.stages is not None:
            diagnostics["stages"] = run.stages
        alternatives = {name: x.to(features.dtype) for name, x in run.starts.items()}
        alternatives["refined"] = fit.x.to(features.dtype)
        return Reconstruction(images.to(features.dtype), diagnostics, alternatives,
                              intermediates=[r.detach() for r in run.recovered])

    def _attempt(self, stages: list[Stage], decoder: nn.Module, reading: Exact, tau2: float,
                 left: float | None) -> Attempt:
        """The decoder's image, PEEL's block-wise image, and the MAP fit from both, for the released features that
        ``reading`` reads (the attacked ones, or the calibration images' queried ones)."""
        observed = reading.observed
        with torch.no_grad():
            decoded = decoder(observed.float()).to(observed.dtype)
        starts = {"decoder": decoded}
        blockwise = torch.zeros(len(observed), dtype=torch.long, device="cpu")  # counts: on the CPU
        recovered: list[torch.Tensor] = []
        stage_diagnostics = None
        if self.blockwise:
            recovered, stage_diagnostics = self._peel().invert_stages(stages, observed, reading)
            starts["blockwise"] = recovered[0].clamp(0.0, 1.0)
            blockwise = torch.tensor([d["evaluations"] for d in stage_diagnostics], device="cpu").sum(0)
        weight = self.prior_scale * noise_variance(reading) / max(tau2, 1e-12)
        fit = self._refine(stages, reading, starts, decoded, weight, left)
        return Attempt(fit, starts, reading, weight, recovered, stage_diagnostics, blockwise)

    def _shrinkage(self, features: torch.Tensor, context: AttackContext, attack: Callable[[torch.Tensor], Attempt],
                   images: torch.Tensor, released: torch.Tensor) -> tuple[Shrinkage, bool]:
        """α of the blend decoder + α (fit - decoder), chosen on the first ``calibration`` auxiliary images
        (module docstring); cached per cell, so every chunk of a cell blends alike. α = 1 (the fit as it is)
        without calibration images; the caller skips it where the reading weights no prior (an exact or masked
        release, whose fit the features pin down)."""
        shrinkage = Shrinkage(features.device)
        count = min(self.calibration, len(images))
        if count == 0:
            return shrinkage, False
        calibration_images, calibration_features = images[:count], released[:count]

        def calibrate(module: Shrinkage) -> None:
            run = attack(calibration_features)
            module.fit(calibration_images.to(run.fit.x.dtype), run.starts["decoder"], run.fit.x,
                       int(run.fit.evaluations.sum() + run.blockwise_evaluations.sum()))

        key = None if context.cache_key is None else {
            "attack": self.name, **self.params, "context": context.cache_key, "features": list(features.shape[1:])}
        return cached_module(shrinkage, self.name, key, context.cache_dir, calibrate)

    def _refine(self, stages: list[Stage], reading: Exact, starts: dict[str, torch.Tensor], decoded: torch.Tensor,
                weight: torch.Tensor, max_seconds: float | None) -> MultiStartFit:
        """The end-to-end MAP fit from each start; per sample the one with the lower objective wins."""
        forward = chain(stages)
        if reading.changes_fit:
            data = reading.data_loss(forward, pre_relu_forward(stages))
        else:
            data = end_to_end_loss(stages, reading.observed)
        tv = reading.image_prior(self.tv_weight, self.tv_prior)
        pull = least_norm(weight.to(decoded.dtype), decoded) if bool(weight.gt(0).any()) else None
        regulariser = combined(tv, pull) if tv is not None and pull is not None else (tv or pull)
        return fit_from_starts(forward, reading.observed, starts, score=combined(data, regulariser),
                               max_evals=self.max_evaluations, max_seconds=max_seconds, lower=0.0, upper=1.0,
                               max_iter=self.refine_iter, regulariser=regulariser, data_loss=data,
                               history=END_TO_END_HISTORY)


def noise_variance(reading: Exact) -> torch.Tensor:
    """σ² per sample, shape (B,), of an observation model with noise (``Noisy``, ``Quantized``'s rounding); zeros
    for an exact or masked reading."""
    sigma = getattr(reading, "sigma", None)
    if sigma is None:
        return torch.zeros(len(reading.observed), dtype=reading.observed.dtype, device=reading.observed.device)
    return sigma.flatten(1)[:, 0].pow(2).expand(len(reading.observed)).clone()


@torch.no_grad()
def release_mismatch(client: nn.Module, images: torch.Tensor, released: torch.Tensor) -> float:
    """r² = E||release(x) - client(x)||² / E||client(x)||² over auxiliary ``images`` and their ``released``
    features (a query): how far the defense's release is from the client's own features, measured through the
    query oracle and the client's weights (both known to this attacker). 0 for an exact release."""
    clean = client(images).float()
    return float((released.float() - clean).pow(2).sum() / clean.pow(2).sum().clamp_min(1e-30))


def measured_noise(reading: Exact, mismatch: float) -> Exact:
    """A reading that says the release is exact, or has no model of it, while the queries show it is not
    (``release_mismatch`` above ``MISMATCH_TOLERANCE``): read as noise of that measured relative power instead,
    σ_b = r · (clean RMS of sample b), so the fit is weighted toward the decoder as far as the release departs
    from the client (``learned_noise``'s gains, ``vib``'s sigma, a secret projection)."""
    if reading.changes_fit or mismatch <= MISMATCH_TOLERANCE:
        return reading
    y, r = reading.observed, math.sqrt(mismatch)
    rms = y.flatten(1).pow(2).mean(dim=1).sqrt() / math.sqrt(1 + mismatch)  # E||y||² = ||f||²(1 + r²)
    note = (f"{reading.note}; the queried release departs from the client's features by relative power "
            f"{mismatch:.3g}: read as noise of that power")
    return Noisy(y, reading.defense, note, sigma=per_sample(r * rms, y))


@torch.no_grad()
def decoder_error(decoder: nn.Module, images: torch.Tensor, released: torch.Tensor) -> float:
    """The decoder's mean squared error per pixel on auxiliary ``images`` from their ``released`` features (a
    fresh query of the client and its defense): τ² of the prior."""
    return float(F.mse_loss(decoder(released.float()), images.float()))


@dataclass
class Attempt:
    """One pass of the hybrid over released features: the multi-start fit, its starts, the reading, the MAP weight
    per sample, PEEL's block-wise recovery (empty without ``blockwise``) and its per-sample evaluations."""

    fit: MultiStartFit
    starts: dict[str, torch.Tensor]
    reading: Exact
    weight: torch.Tensor
    recovered: list[torch.Tensor]
    stages: list[dict[str, Any]] | None
    blockwise_evaluations: torch.Tensor


class Shrinkage(nn.Module):
    """The calibrated blend decoder + α (fit - decoder), α in [0, 1], as buffers so the attack cache stores it:
    α and, from the calibration, the decoder's, the fit's and the blend's mean squared error per pixel and the
    evaluations the calibration spent. A fresh one is α = 1 (the fit as it is), uncalibrated."""

    alpha: torch.Tensor
    errors: torch.Tensor
    evaluations: torch.Tensor
    images: torch.Tensor

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64, device=device))
        self.register_buffer("errors", torch.full((3,), float("nan"), dtype=torch.float64, device=device))
        self.register_buffer("evaluations", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("images", torch.zeros((), dtype=torch.long, device=device))

    @torch.no_grad()
    def fit(self, truth: torch.Tensor, decoded: torch.Tensor, refined: torch.Tensor, evaluations: int) -> None:
        """The α that minimises the blend's squared error on the calibration images (closed form, clipped)."""
        step, miss = (refined - decoded).double(), (truth - decoded).double()
        alpha = float((miss * step).sum() / step.pow(2).sum().clamp_min(1e-30))
        self.alpha.fill_(min(max(alpha, 0.0), 1.0))
        blend = decoded.double() + float(self.alpha) * step
        self.errors.copy_(torch.stack([miss.pow(2).mean(), (truth.double() - refined.double()).pow(2).mean(),
                                       (truth.double() - blend).pow(2).mean()]))
        self.evaluations.fill_(evaluations)
        self.images.fill_(len(truth))

    def diagnostics(self, from_cache: bool) -> dict[str, Any]:
        decoder, refined, blend = (float(e) for e in self.errors)
        return {"alpha": float(self.alpha), "images": int(self.images), "decoder_mse": decoder,
                "refined_mse": refined, "blend_mse": blend, "evaluations": int(self.evaluations),
                "from_cache": from_cache}
