"""Readers registered per defense *class* (as Opacus registers its grad samplers per layer class): each turns a
``PublicDefense`` and the observed features into an observation model (``attacks.peel.observation``). A defense
of another package registers its own reader beside itself; one with none makes adaptive PEEL plain PEEL, and
the diagnostics say so. The built-in defenses' readers are below."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from leakbench.attacks.base import PublicDefense
from leakbench.attacks.peel.observation import Exact, Masked, Noisy, Quantized, Unmodelled
from leakbench.defenses.disco import Disco
from leakbench.defenses.learned_noise import LearnedNoise
from leakbench.defenses.noise import FeatureDP, GaussianNoise, LaplaceNoise, NoDefense
from leakbench.defenses.pruning import Pruning
from leakbench.defenses.sparsify import CutDropout, Quantization, TopK
from leakbench.splitnn.batch import per_sample

Reader = Callable[[PublicDefense, torch.Tensor], Exact]
_readers: dict[type, Reader] = {}


def register_reader(*defense_classes: type) -> Callable[[Reader], Reader]:
    """Decorator: ``reader(defense: PublicDefense, observed: Tensor) -> Exact`` (or a subclass: ``Noisy``,
    ``Masked``, ``Quantized``) is how adaptive PEEL reads defenses of these classes and their subclasses."""
    def decorate(reader: Reader) -> Reader:
        for cls in defense_classes:
            _readers[cls] = reader
        return reader
    return decorate


def reader_for(defense_class: type | None) -> Reader | None:
    """The reader registered for ``defense_class`` or its nearest base class, or None."""
    for cls in (defense_class.__mro__ if defense_class is not None else ()):
        if cls in _readers:
            return _readers[cls]
    return None


def read_defense(defense: PublicDefense, observed: torch.Tensor) -> Exact:
    """How ``observed`` came from the clean features, by the reader of the defense's class.

    A Defense object is refused (use ``PublicDefense.of(defense)``): its random state is not public. Without a
    reader: a training defense releases its features exactly; any other is plain PEEL, and the note says so.
    """
    if not isinstance(defense, PublicDefense):
        raise TypeError(f"read_defense needs a PublicDefense (PublicDefense.of(defense)), not "
                        f"{type(defense).__name__}: a defense-aware attacker knows the defense's kind and public "
                        "parameters, never its random state")
    reader = reader_for(defense.cls)
    if reader is not None:
        return reader(defense, observed)
    if defense.kind == "training":
        return Exact(observed, defense.name, "training defense: features released as computed: exact fit")
    what = defense.cls.__name__ if defense.cls is not None else "an unknown class"
    return Unmodelled(observed, defense.name, f"no observation model of defense {defense.name!r} ({what}) is "
                      "registered (attacks.peel.readers.register_reader): plain PEEL")


# ---------------------------------------------------------------- the built-in defenses

@register_reader(NoDefense, type(None))
def _none(defense: PublicDefense, y: torch.Tensor) -> Exact:
    return Exact(y, "none", "no defense: exact fit")


@register_reader(GaussianNoise, LaplaceNoise, LearnedNoise)
def _scaled_noise(defense: PublicDefense, y: torch.Tensor) -> Exact:
    # learned_noise: its gains are secret but have mean(w²) = 1, so it has gaussian_noise's power at its scale;
    # read as isotropic noise of that power (the gains' shape is not modelled)
    name, params = defense.name, defense.params
    scale = float(params["scale"])
    if scale == 0:
        return Exact(y, name, "scale 0: exact fit")
    if params.get("relative", True):
        # E||y||² = ||f||²(1 + s²): the clean RMS follows from the observed one
        rms = y.flatten(1).pow(2).mean(dim=1).sqrt() / math.sqrt(1 + scale ** 2)
        sigma = per_sample(scale * rms, y)
    else:
        sigma = per_sample(torch.full_like(y.flatten(1)[:, 0], scale), y)
    return Noisy(y, name, f"noise of std σ (scale {scale}): MAP with a TV prior", sigma=sigma)


@register_reader(FeatureDP)
def _feature_dp(defense: PublicDefense, y: torch.Tensor) -> Exact:
    dp = FeatureDP(**defense.params)  # rebuilt from its public parameters: its deterministic clipping and σ
    std = dp.noise_scale * (math.sqrt(2.0) if dp.mechanism == "laplace" else 1.0)
    if std == 0 and math.isinf(dp.clip):
        return Exact(y, defense.name, "epsilon inf, clip inf: exact fit")
    sigma = per_sample(torch.full_like(y.flatten(1)[:, 0], max(std, 1e-12)), y)
    return Noisy(y, defense.name, "clipped features plus calibrated noise: MAP with a TV prior, clipping in the "
                 "forward model", sigma=sigma, clip=dp.clip_features)


@register_reader(Pruning, Disco)
def _pruning(defense: PublicDefense, y: torch.Tensor) -> Exact:
    # The pruned channels are not public (the defense chose them on training data; DISCO's pruning network, its
    # secret state, chooses them per sample); in the observation they are zero throughout. Read per sample (a
    # channel zero in the whole sample), so samples stay independent, and DISCO's per-sample masks are read too.
    if int(float(defense.params.get("ratio", 0.0)) * y.shape[1]) == 0:  # as many channels as it removes
        return Exact(y, defense.name, "no channel pruned: exact fit")
    released = y.flatten(2).ne(0).any(dim=2) if y.dim() > 2 else y.ne(0)   # (B, C)
    mask = released.view(*released.shape, *([1] * (y.dim() - 2))).expand_as(y)
    return Masked(y, defense.name, "fit on the channels not zero throughout the sample", mask=mask,
                  extras={"removed_channels": float((~released).sum(dim=1).double().mean())})


@register_reader(TopK)
def _topk(defense: PublicDefense, y: torch.Tensor) -> Exact:
    if float(defense.params.get("keep", 1.0)) >= 1.0:
        return Exact(y, defense.name, "keep 1: exact fit")
    flat = y.flatten(1).abs()
    smallest = torch.where(flat > 0, flat, torch.full_like(flat, math.inf)).amin(dim=1)
    return Masked(y, defense.name, "fit on the released entries; the zeroed ones are at most the smallest "
                  "released magnitude", mask=y.ne(0), threshold=per_sample(smallest, y))


@register_reader(CutDropout)
def _dropout(defense: PublicDefense, y: torch.Tensor) -> Exact:
    p = float(defense.params.get("p", 0.0))
    if p == 0:
        return Exact(y, defense.name, "p 0: exact fit")
    scale = 1.0 / (1.0 - p) if defense.params.get("rescale", True) else 1.0
    return Masked(y, defense.name, "fit on the surviving entries, scaled back by 1-p", mask=y.ne(0), scale=scale)


@register_reader(Quantization)
def _quantization(defense: PublicDefense, y: torch.Tensor) -> Exact:
    params: dict[str, Any] = defense.params
    bits = params.get("bits")
    if bits is None:
        return Exact(y, defense.name, "bits null: exact fit")
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
    return Quantized(y, defense.name, note, low=low, high=high, sigma=sigma)
