"""An attack-independent bound: dFIL (Maeng et al., "Bounding the Invertibility of Privacy-preserving Instance
Encoding using Fisher Information", NeurIPS 2023).

The released features ``z = mean(client(x)) + std(client(x)) * e`` (a noise defense's ``NoiseLaw``) carry Fisher
information ``I(x)`` about the image ``x``; with ``d`` pixels, ``dFIL(x) = tr I(x) / d``. By the Cramer-Rao bound and
``tr(I^-1) >= d^2 / tr(I)``, any *unbiased* attacker's expected squared error per pixel is at least ``1 / dFIL(x)``,
so its PSNR (data range 1) of that expected error is at most ``10 log10 dFIL(x)``. The bound says nothing about a
biased attacker (a prior, a clamp to [0, 1], early stopping): those can and do go below it.

For Gaussian noise of a fixed sigma, ``tr I = ||J||_F^2 / sigma^2`` with J the Jacobian of the noise-free release at
x. Noise relative to the features' scale has a sigma that depends on x; we do not treat it as fixed: the release is
then N(mean(x), sigma(x)^2 I), whose Fisher information adds the scale term ``2 m |grad sigma|^2 / sigma^2`` (m
features; ``NoiseLaw`` gives the general form, e.g. Laplace). So

    tr I(x) = sum_k  a |grad mean_k|^2 / std_k^2  +  b |grad std_k|^2 / std_k^2        (a, b from the NoiseLaw)

computed with forward-mode Jacobian-vector products at the *true* image (an evaluator's quantity, computed after the
attack and never given to it): exactly over the pixel basis when ``d <= EXACT_MAX_PIXELS``, else as a Hutchinson
estimate ``E_u[u^T I u]`` over ``PROBES`` Rademacher directions u, with its standard error. A defense that adds no
noise (none, quantization, top-k, pruning, a training defense, whose features pass unchanged) is unbounded:
dFIL = inf, bound 0. A new noise defense declares ``noise_law()`` (``defenses.noise.NoiseLaw``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leakbench.defenses.base import Defense, TrainingDefense
from leakbench.defenses.noise import NoiseLaw

#: Images of at most this many values (C x H x W) get the exact trace, one JVP per pixel; larger ones a Hutchinson
#: estimate. 256 JVPs of a small client on a few images take well under a second on a CPU.
EXACT_MAX_PIXELS = 256
#: Rademacher probes of the Hutchinson estimate (each one JVP over the attacked images); its standard error is
#: reported beside it.
PROBES = 32
#: Images x directions per JVP call (the directions are folded into the batch: the client is batch-independent in
#: eval mode, as the attacks already assume).
MAX_BATCH = 1024
#: Images with more values than this are not bounded at all (cost; the cell says so): an ImageNet-stem client at
#: 224 x 224 still fits (150,528 values).
MAX_PIXELS = 3 * 256 * 256

__all__ = ["Bound", "EXACT_MAX_PIXELS", "MAX_PIXELS", "PROBES", "bound", "fisher_trace"]


@dataclass
class Bound:
    """Per image: ``trace`` of the Fisher information (``trace_se`` its standard error, 0 when exact), ``pixels``
    (d), and how it was obtained (``method``) or why there is none (``reason``)."""

    trace: torch.Tensor
    trace_se: torch.Tensor
    pixels: int
    method: str
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def dfil(self) -> torch.Tensor:
        return self.trace / self.pixels

    @property
    def mse_bound(self) -> torch.Tensor:
        """The least expected squared error per pixel of any unbiased attacker: 1 / dFIL (0 when unbounded)."""
        return 1.0 / self.dfil

    @property
    def psnr_bound(self) -> torch.Tensor:
        """The highest PSNR (dB, data range 1) of an unbiased attacker's expected squared error: 10 log10 dFIL."""
        return 10.0 * torch.log10(self.dfil)

    def per_image(self) -> dict[str, list[float]]:
        """The per-image metric columns ``dfil``, ``dfil_mse_bound``, ``dfil_psnr_bound``."""
        return {"dfil": self.dfil.tolist(), "dfil_mse_bound": self.mse_bound.tolist(),
                "dfil_psnr_bound": self.psnr_bound.tolist()}

    def diagnostics(self) -> dict[str, Any]:
        return {"method": self.method, "reason": self.reason, "pixels": self.pixels,
                "trace_se": self.trace_se.tolist(), **self.details}


def _constant(n: int, value: float, pixels: int, method: str, reason: str) -> Bound:
    full = torch.full((n,), value, dtype=torch.float64)
    return Bound(full, torch.zeros(n, dtype=torch.float64), pixels, method, reason)


def noise_law(defense: Defense | None, features: torch.Tensor) -> NoiseLaw | str:
    """The defense's noise law, or why it has none: a defense without ``noise_law`` is checked for randomness
    (two reseeded copies on the same features) so that a new random defense is never reported unbounded."""
    if defense is None:
        return "adds no noise to the released features (they pass unchanged at inference)"
    declared = getattr(defense, "noise_law", None)  # a training defense may release noise too (vib)
    if declared is None and isinstance(defense, TrainingDefense):
        return "adds no noise to the released features (they pass unchanged at inference)"
    if declared is not None:
        law = declared()
        return law if law is not None else getattr(defense, "no_noise_reason", "adds no noise at this strength")
    with torch.no_grad():
        if torch.equal(defense.reseeded(1)(features), defense.reseeded(2)(features)):
            return "adds no noise (a deterministic function of the features)"
    raise LookupError(f"{type(defense).__name__} is random but declares no noise_law(): its Fisher information is "
                      f"unknown")


def fisher_trace(client: nn.Module, law: NoiseLaw, x: torch.Tensor, probes: int | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, tr I(x) of the release ``law.mean(client(x)) + law.std(client(x)) * e`` and its standard error:
    exact over the pixel basis when ``probes`` is None, else the mean of ``probes`` Rademacher quadratic forms."""
    n, pixels = x.shape[0], x[0].numel()
    directions = pixels if probes is None else probes
    generator = torch.Generator(device=x.device).manual_seed(seed)
    per_call = max(1, MAX_BATCH // max(n, 1))
    values = []
    for start in range(0, directions, per_call):
        count = min(per_call, directions - start)
        if probes is None:  # the pixel basis: direction j is e_j in every image
            tangent = torch.zeros(count, n, pixels, dtype=x.dtype, device=x.device)
            tangent[torch.arange(count), :, torch.arange(start, start + count)] = 1.0
        else:
            tangent = torch.randint(0, 2, (count, n, pixels), generator=generator, device=x.device).to(x.dtype)
            tangent = 2.0 * tangent - 1.0
        values.append(_quadratic_forms(client, law, x, tangent.view(count * n, *x.shape[1:])).view(count, n))
    forms = torch.cat(values).double()
    if probes is None:
        return forms.sum(dim=0), torch.zeros(n, dtype=torch.float64, device=forms.device)
    se = (forms.std(dim=0) / math.sqrt(probes) if probes > 1 else
          torch.full((n,), math.nan, dtype=torch.float64, device=forms.device))
    return forms.mean(dim=0), se


def _quadratic_forms(client: nn.Module, law: NoiseLaw, x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """u^T I(x) u for each direction u in ``tangent`` (the images of ``x`` repeated to match)."""
    repeated = x.repeat(tangent.shape[0] // x.shape[0], *([1] * (x.dim() - 1)))

    def release(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = client(images)
        mean = law.mean(features)
        return mean, law.std(features).expand_as(mean) + 0.0 * mean  # keeps std's tangent defined when constant

    with torch.enable_grad():
        result = torch.func.jvp(release, (repeated,), (tangent,))
    (_, std), (d_mean, d_std) = result[0], result[1]
    location = (d_mean / std).pow(2).flatten(1).sum(dim=1)
    scale = (d_std / std).pow(2).flatten(1).sum(dim=1)
    return (law.location_information * location.double() + law.scale_information * scale.double()).detach()


def bound(client: nn.Module, defense: Defense | None, x: torch.Tensor, seed: int = 0) -> Bound:
    """The dFIL bound of each of the true images ``x`` under the client and its defense (see the module docstring);
    unbounded (dFIL inf) for a defense that adds no noise, NaN with the reason when it cannot be computed."""
    n, pixels = x.shape[0], x[0].numel()
    with torch.no_grad():
        features = client(x)
    try:
        law = noise_law(defense, features)
    except LookupError as exc:
        return _constant(n, math.nan, pixels, "unknown", str(exc))
    if isinstance(law, str):
        return _constant(n, math.inf, pixels, "unbounded", law)
    if pixels > MAX_PIXELS:
        return _constant(n, math.nan, pixels, "skipped", f"images of {pixels} values > MAX_PIXELS ({MAX_PIXELS})")
    probes = None if pixels <= EXACT_MAX_PIXELS else PROBES
    try:
        trace, se = fisher_trace(client, law, x, probes=probes, seed=seed)
    except (RuntimeError, NotImplementedError) as exc:  # e.g. an operation without forward-mode AD
        return _constant(n, math.nan, pixels, "failed", f"{type(exc).__name__}: {exc}")
    method = "exact" if probes is None else f"hutchinson ({probes} probes)"
    return Bound(trace, se, pixels, method, None,
                 {"location_information": law.location_information, "scale_information": law.scale_information})
