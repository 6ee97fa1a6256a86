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
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    multiplies the MAP weight (1 is the Gaussian MAP). ``prior_scale`` 0.1 and ``tv_weight`` 0 were chosen by
    ``benchmarks/tune_attacks.py --attacks peel_prior`` on the validation slice, which no experiment reports
    (mean 39.8 dB; the MAP weight 1.0: 39.7; PEEL's TV weight 0.3: 31.0, since TV pulls an exact fit from a
    good start away from the truth). ``tv_weight``, ``tv_prior``, ``max_iter`` and
    ``refine_iter`` mean what they mean for PEEL; ``hidden``, ``epochs``, ``lr``, ``batch_size`` and ``seed``
    what they mean for ``inverse_net``. ``max_evaluations`` caps the refinement's end-to-end evaluations per
    sample (split across its starts) and ``max_seconds`` the whole attack after the decoder is trained.

    Knowledge: client weights, auxiliary data, query access, and the defense when ``adaptive``.
    """

    base_knowledge = frozenset({Knowledge.CLIENT_WEIGHTS, Knowledge.AUXILIARY_DATA, Knowledge.QUERY_ACCESS})
    reports_block_errors = True
    #: one decoder pass and one fit per sample; τ² comes from auxiliary images, never from the batch
    batch_independent = True

    def __init__(self, adaptive: bool = True, prior_scale: NonNegative = 0.1, blockwise: bool = True,
                 max_iter: Count = 50, refine_iter: Count = 300, tv_weight: NonNegative = 0.0,
                 tv_prior: NonNegative = 5.0, hidden: PositiveCount = 64, epochs: Count = 15, lr: Positive = 5e-3,
                 batch_size: PositiveCount = 32, seed: Seed = 0, dtype: Dtype = "float32",
                 max_evaluations: Evaluations | None = None, max_seconds: Seconds | None = None):
        self.adaptive, self.prior_scale, self.blockwise = adaptive, prior_scale, blockwise
        self.max_iter, self.refine_iter, self.tv_weight, self.tv_prior = max_iter, refine_iter, tv_weight, tv_prior
        self.hidden, self.epochs, self.lr, self.batch_size, self.seed = hidden, epochs, lr, batch_size, seed
        self.dtype, self.max_evaluations, self.max_seconds = dtype, max_evaluations, max_seconds

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
        dtype = getattr(torch, self.dtype)
        inverse = self._decoder()
        decoder, from_cache, losses = inverse.fitted_decoder(features, context)
        start = time.perf_counter()  # the refinement's budget starts after training, as the decoder is reusable
        with torch.no_grad():
            decoded = decoder(features.float()).to(dtype)
            tau2 = decoder_error(decoder, aux_images, query)
        observed = features.detach().to(dtype)
        stages = extract_stages(client, shape, dtype)
        reading = read_defense(context.require("defense", by=self), observed) if self.adaptive else Exact(observed)
        mismatch = release_mismatch(client, aux_images, query)
        if self.adaptive:
            reading = measured_noise(reading, mismatch)
        starts = {"decoder": decoded}
        diagnostics: dict[str, Any] = {"decoder_from_cache": from_cache, "decoder_train_losses": losses,
                                       "decoder_mse": tau2, "release_mismatch": mismatch,
                                       "auxiliary_images": len(aux_images)}
        blockwise_evals = torch.zeros(len(features), dtype=torch.long, device="cpu")  # counts: on the CPU
        recovered: list[torch.Tensor] = []
        if self.blockwise:
            recovered, stage_diagnostics = self._peel().invert_stages(stages, observed, reading)
            starts["blockwise"] = recovered[0].clamp(0.0, 1.0)
            blockwise_evals = torch.tensor([d["evaluations"] for d in stage_diagnostics], device="cpu").sum(0)
            diagnostics["stages"] = stage_diagnostics
        weight = self.prior_scale * noise_variance(reading) / max(tau2, 1e-12)
        left = None if self.max_seconds is None else max(self.max_seconds - (time.perf_counter() - start), 0.0)
        fit = self._refine(stages, reading, starts, decoded, weight, left)
        forward = chain(stages)
        seconds = time.perf_counter() - start
        diagnostics.update({
            "adaptive": reading.diagnostics() if self.adaptive else None,
            "prior_weight_mean": float(weight.mean()),
            "refine_start": fit.chosen, "refine_objectives": {k: float(v.mean()) for k, v in fit.scores.items()},
            "decoder_residual": relative_residual(forward, decoded, observed),
            "refined_residual": relative_residual(forward, fit.x, observed),
            "iterations": int(fit.iterations.max()), "seconds": seconds,
            "budget": budget(seconds, fit.iterations, fit.evaluations, blockwise_evals)})
        alternatives = {name: x.to(features.dtype) for name, x in starts.items()}
        return Reconstruction(fit.x.to(features.dtype), diagnostics, alternatives,
                              intermediates=[r.detach() for r in recovered])

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
def release_mismatch(client: nn.Module, images: torch.Tensor, query: Any) -> float:
    """r² = E||release(x) - client(x)||² / E||client(x)||² on (at most ``PRIOR_SAMPLES``) auxiliary images: how far
    the defense's release is from the client's own features, measured through the query oracle and the client's
    weights (both known to this attacker). 0 for an exact release."""
    sample = images[:PRIOR_SAMPLES]
    clean = client(sample).float()
    released = query(sample).float()
    return float((released - clean).pow(2).sum() / clean.pow(2).sum().clamp_min(1e-30))


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
def decoder_error(decoder: nn.Module, images: torch.Tensor, query: Any) -> float:
    """The decoder's mean squared error per pixel on (at most ``PRIOR_SAMPLES``) auxiliary images, through a fresh
    query of the client and its defense: τ² of the prior."""
    sample = images[:PRIOR_SAMPLES]  # a tensor, also from a lazy set
    return float(F.mse_loss(decoder(query(sample).float()), sample.float()))
