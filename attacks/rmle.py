"""rMLE (He, Zhang & Lee, ACSAC 2019): optimise the image so the client's output matches the features."""
from __future__ import annotations

import copy
import hashlib
import time
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Dtype, Evaluations, Knowledge, Reconstruction, budget
from leakbench.attacks.optim import END_TO_END_HISTORY, fit_from_starts, relative_residual
from leakbench.attacks.peel.chain import chain, end_to_end_loss
from leakbench.attacks.peel.stages import UnsupportedLayerError, build_stages, extract_stages
from leakbench.attacks.priors import Forward, Loss, tv_prior
from leakbench.attacks.registry import register
from leakbench.splitnn.errors import ParameterError, check_choice, check_number
from leakbench.splitnn.params import Seconds

START_KINDS = ("grey", "zeros", "uniform")
MAX_STARTS = 64


def _normalise_starts(starts: Any) -> list[str]:
    """A list of start kinds, or a count k: grey then k - 1 seeded uniform starts."""
    if isinstance(starts, int) and not isinstance(starts, bool):
        count = check_number("starts", starts, low=1, high=MAX_STARTS, integer=True)
        return ["grey"] + ["uniform"] * (count - 1)
    if isinstance(starts, str):
        starts = [starts]
    if not isinstance(starts, (list, tuple)) or not 1 <= len(starts) <= MAX_STARTS:
        raise ParameterError("starts", starts, f"a count 1..{MAX_STARTS} or a list of 1..{MAX_STARTS} of "
                             + ", ".join(START_KINDS))
    return [check_choice("starts", s, START_KINDS) for s in starts]


def sample_seed(features: torch.Tensor, seed: int, index: int) -> int:
    """A seed for one sample's random start, from its own observed features (so it does not depend on the
    sample's position or batch) and the attack's seed."""
    digest = hashlib.sha256(features.detach().cpu().double().contiguous().numpy().tobytes())
    digest.update(f"{seed}/{index}".encode())
    return int.from_bytes(digest.digest()[:8], "little")


def start_image(kind: str, index: int, features: torch.Tensor, shape: tuple[int, int, int], seed: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The batch of start images of one kind (``index``: which start it is, so repeated uniforms differ)."""
    n = features.shape[0]
    if kind == "grey":
        return torch.full((n, *shape), 0.5, dtype=dtype, device=features.device)
    if kind == "zeros":
        return torch.zeros((n, *shape), dtype=dtype, device=features.device)
    # drawn on the CPU, so a seed gives the same start on every device
    return torch.stack([torch.rand(shape, dtype=dtype, device="cpu", generator=torch.Generator().manual_seed(
        sample_seed(features[b], seed, index))) for b in range(n)]).to(features.device)


@register("rmle")
class RMLE(Attack):
    """White-box regularised maximum-likelihood estimation: argmin_x ||client(x) - f||² + λ·TV(x), x in [0, 1].

    Solved per sample with the box-constrained L-BFGS every fit uses (``attacks.box_lbfgs``), in float64 by
    default. He et al.'s attack is the default (plain loss, one grey start). For an equal-budget ablation
    against PEEL: ``loss="relu_consistency"`` is PEEL's refinement loss, ``starts`` several starts of which
    each sample keeps the fit whose features match its observation best (as PEEL's refinement picks),
    ``max_evaluations`` caps the end-to-end evaluations per sample (split across the starts) and
    ``max_seconds`` the wall time. ``iterations`` caps each start's L-BFGS iterations.
    """

    base_knowledge = frozenset({Knowledge.CLIENT_WEIGHTS})

    def __init__(self, iterations: Annotated[int, Field(ge=1, le=10 ** 6)] = 500,
                 tv_weight: Annotated[float, Field(ge=0, le=1e6)] = 0.03, starts: Any = ("grey",),
                 loss: Literal["plain", "relu_consistency"] = "plain", max_evaluations: Evaluations | None = None,
                 max_seconds: Seconds | None = None, seed: Annotated[int, Field(ge=0, le=2 ** 31 - 1)] = 0,
                 dtype: Dtype = "float64"):
        self.iterations, self.tv_weight, self.loss, self.seed, self.dtype = iterations, tv_weight, loss, seed, dtype
        self.starts = _normalise_starts(starts)  # a count or a list: one parameter, two spellings
        if max_evaluations is not None and max_evaluations < len(self.starts):
            raise ParameterError("max_evaluations", max_evaluations,
                                 f"at least one evaluation per start ({len(self.starts)})")
        self.max_evaluations, self.max_seconds = max_evaluations, max_seconds

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        if self.loss == "relu_consistency":  # needs the client's last ReLU, which PEEL's stages expose
            try:
                build_stages(client)
            except UnsupportedLayerError as exc:
                return False, f"loss relu_consistency needs PEEL's stages of the client: {exc}"
        return True, ""

    def objective(self, client: nn.Module, shape: tuple[int, int, int], dtype: torch.dtype,
                  target: torch.Tensor) -> tuple[Forward, Loss | None]:
        """The forward map and the data term (``None``: the plain squared error)."""
        if self.loss == "relu_consistency":
            stages = extract_stages(client, shape, dtype)
            return chain(stages), end_to_end_loss(stages, target)
        model = copy.deepcopy(client).eval().to(dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        return model, None

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        shape = context.require("image_shape", by=self)
        dtype = getattr(torch, self.dtype)
        start = time.perf_counter()
        target = features.detach().to(dtype)
        forward, data_loss = self.objective(client, shape, dtype, target)
        names = [kind if self.starts.count(kind) == 1 else f"{kind}{i}" for i, kind in enumerate(self.starts)]
        starts = {name: start_image(kind, i, target, shape, self.seed, dtype)
                  for i, (name, kind) in enumerate(zip(names, self.starts))}
        regulariser = tv_prior(self.tv_weight)
        fit = fit_from_starts(forward, target, starts, max_evals=self.max_evaluations, max_seconds=self.max_seconds,
                              lower=0.0, upper=1.0, max_iter=self.iterations, regulariser=regulariser,
                              data_loss=data_loss, history=END_TO_END_HISTORY)
        seconds = time.perf_counter() - start
        return Reconstruction(fit.x.to(features.dtype), {
            "iterations": int(fit.iterations.max()), "residual": relative_residual(forward, fit.x, target),
            "start": fit.chosen,
            "start_residuals": {k: f.residual for k, f in fit.fits.items()}, "loss": self.loss,
            "timed_out": any(f.timed_out for f in fit.fits.values()), "seconds": seconds,
            "budget": budget(seconds, fit.iterations, fit.evaluations)})

