"""PEEL (Arif et al., SaTML 2025): invert the client half block by block, from the cut back to the image."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from attacks.base import Attack, Knowledge, Reconstruction, require_image_shape
from attacks.optim import FitResult, fit_input, relative_residual, relu_consistency, sample_residuals
from attacks.peel.adaptive import DefenseReading, fit_image_adaptive, invert_stage_adaptive, read_defense
from attacks.peel.paper_solver import invert_stage_paper
from attacks.peel.solver import invert_stage
from attacks.peel.stages import Stage, UnsupportedLayerError, build_stages, extract_stages
from attacks.registry import register
from attacks.rmle import total_variation
from splitnn.errors import check_bool, check_choice, check_number


def stage_bounds(stages: list[Stage], index: int) -> tuple[float | None, float | None]:
    """Bounds on a stage's input: the image is in [0, 1]; after a ReLU the input is >= 0."""
    if index == 0:
        return 0.0, 1.0
    return (0.0 if stages[index - 1].output_nonnegative else None), None


@register("peel")
class PEEL(Attack):
    """Backward, block-by-block inversion of a residual client half, then (by default) an end-to-end polish.

    Each stage is solved on its own and its recovered input becomes the previous stage's
    target, from the cut back to the image. ``solver="default"`` warm-starts each stage
    (x ≈ y through an identity shortcut, the shortcut's least-squares inverse through a strided
    one), iterates ``x <- y - W2·ReLU(W1·x)`` on identity blocks and polishes with a batched
    box-constrained L-BFGS under the ReLU-implied bounds (``block_iter`` iterations per block,
    ``max_iter`` per layer group such as the stem). Few block iterations are on purpose: where a block
    drops information (the zeros of a ReLU after the addition, a stride) its target is only the next
    block's estimate, and fitting it exactly amplifies that error along the chain; for the same reason
    ``prior_weight`` adds a least-norm prior on blocks with a ReLU after the addition (1.0 weighs it
    like the data term; on the post-ReLU networks of ``benchmarks/peel_quality.py`` it gave lower
    block-wise image error than 0.1 or 0.3 at every cut but the first of the ImageNet-stem ResNet-18).
    ``solver="paper"`` is the authors' (x, p, n) formulation with their Adam schedule. With ``refine``
    the block-wise image starts an end-to-end fit of the image through the whole client half (the same
    objective as rMLE), so PEEL starts where block-wise inversion left off rather than from a grey
    image; with ``also_from_grey`` a second fit from rMLE's grey start runs too and, per sample, the one
    whose features match that sample's observation better wins (no ground truth is used), so refined
    PEEL is never behind rMLE on its own objective.
    ``refine=False`` is pure block-wise PEEL.

    ``chaining="oracle_reset"`` restarts every stage from the *true* features at its output, as
    the authors' code did; it needs ``truth`` and is only for reproducing their per-block numbers.

    ``adaptive=True`` is defense-aware PEEL (knowledge adds DEFENSE): it reads the ``defense`` passed to
    ``reconstruct`` (kind and public parameters) and fits what the defense released instead of an exact
    fit (see ``attacks.peel.adaptive``; ``tv_prior`` is the rate β of its TV prior under noise).
    """

    knowledge = frozenset({Knowledge.CLIENT_WEIGHTS})

    def __init__(self, solver: str = "default", refine: bool = True, chaining: str = "honest",
                 max_iter: int = 300, fixed_point_iters: int = 100, refine_iter: int = 500,
                 tv_weight: float = 0.0, also_from_grey: bool = True, prior_weight: float = 1.0,
                 block_iter: int = 10,
                 dtype: str = "float64", adaptive: bool = False, tv_prior: float = 5.0):
        self.solver = check_choice("solver", solver, ("default", "paper"))
        self.refine = check_bool("refine", refine)
        self.chaining = check_choice("chaining", chaining, ("honest", "oracle_reset"))
        self.max_iter = check_number("max_iter", max_iter, low=0, integer=True)
        self.block_iter = check_number("block_iter", block_iter, low=0, integer=True)
        self.fixed_point_iters = check_number("fixed_point_iters", fixed_point_iters, low=0, integer=True)
        self.refine_iter = check_number("refine_iter", refine_iter, low=0, integer=True)
        self.tv_weight = float(check_number("tv_weight", tv_weight, low=0))
        self.also_from_grey = check_bool("also_from_grey", also_from_grey)
        self.prior_weight = float(check_number("prior_weight", prior_weight, low=0))
        self.dtype = check_choice("dtype", dtype, ("float32", "float64"))
        self.adaptive = check_bool("adaptive", adaptive)
        self.tv_prior = float(check_number("tv_prior", tv_prior, low=0))
        if self.adaptive:  # per instance: the defense-aware variant knows more than plain PEEL
            self.knowledge = PEEL.knowledge | {Knowledge.DEFENSE}

    @property
    def params(self) -> dict[str, Any]:
        return {"solver": self.solver, "refine": self.refine, "chaining": self.chaining, "max_iter": self.max_iter,
                "block_iter": self.block_iter, "fixed_point_iters": self.fixed_point_iters,
                "refine_iter": self.refine_iter,
                "tv_weight": self.tv_weight, "also_from_grey": self.also_from_grey,
                "prior_weight": self.prior_weight, "dtype": self.dtype, "adaptive": self.adaptive,
                "tv_prior": self.tv_prior}

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        try:
            build_stages(client)
        except UnsupportedLayerError as exc:
            return False, str(exc)
        return True, ""

    def _invert(self, stage: Stage, target: torch.Tensor, lower: float | None, upper: float | None,
                reading: DefenseReading | None = None, at_cut: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        if reading is not None and reading.changes_fit and (at_cut or reading.kind == "noise"):
            return invert_stage_adaptive(stage, target, reading, at_cut=at_cut, lower=lower, upper=upper,
                                         max_iter=self.max_iter)
        if self.solver == "paper":
            return invert_stage_paper(stage, target, lower=lower, upper=upper)
        return invert_stage(stage, target, lower=lower, upper=upper,
                            max_iter=self.block_iter if stage.kind == "block" else self.max_iter,
                            fixed_point_iters=self.fixed_point_iters, prior_weight=self.prior_weight)

    def reconstruct(self, client: nn.Module, features: torch.Tensor, **ctx: Any) -> Reconstruction:
        shape = require_image_shape(ctx)
        dtype = getattr(torch, self.dtype)
        start = time.perf_counter()
        stages = extract_stages(client, shape, dtype)
        observed = features.detach().to(dtype)
        truth = ctx.get("truth")
        truth = truth.detach().to(dtype) if truth is not None else None
        reading = read_defense(ctx.get("defense"), observed) if self.adaptive else None
        true_outputs: list[torch.Tensor] = []
        if self.chaining == "oracle_reset":
            if truth is None:
                raise ValueError("chaining='oracle_reset' needs truth= (the true images): it restarts each "
                                 "stage from the true features, which no real attacker has")
            true_outputs = stage_outputs(stages, truth)

        stage_diagnostics: list[dict[str, Any]] = [{} for _ in stages]
        recovered: list[torch.Tensor] = [observed] * len(stages)
        target = observed
        for index in reversed(range(len(stages))):
            if self.chaining == "oracle_reset" and index < len(stages) - 1:
                target = true_outputs[index]
            lower, upper = stage_bounds(stages, index)
            target, stage_diagnostics[index] = self._invert(stages[index], target, lower, upper, reading,
                                                            at_cut=index == len(stages) - 1)
            recovered[index] = target
        if truth is not None:  # evaluation only; never used to solve (except by the labelled oracle mode)
            for diag, error in zip(stage_diagnostics, true_input_errors(stages, recovered, truth)):
                diag["true_input_error"] = error

        blockwise = target.clamp(0.0, 1.0)
        diagnostics: dict[str, Any] = {
            "stages": stage_diagnostics, "chaining": self.chaining, "solver": self.solver,
            "blockwise_residual": relative_residual(chain(stages), blockwise, observed),
            "iterations": sum(d["lbfgs_iterations"] + d.get("adam_iterations", 0) for d in stage_diagnostics)}
        if truth is not None:
            diagnostics["blockwise_mse"] = float((blockwise - truth).pow(2).mean())
        images = blockwise
        if reading is not None:
            diagnostics["adaptive"] = reading.diagnostics()
        if self.refine and reading is not None and reading.changes_fit:
            images = self._refine_adaptive(stages, reading, blockwise, diagnostics)
        elif self.refine:
            fits = {"blockwise": fit_image(stages, observed, blockwise, self.refine_iter, self.tv_weight)}
            if self.also_from_grey:
                fits["grey"] = fit_image(stages, observed, torch.full_like(blockwise, 0.5), self.refine_iter,
                                         self.tv_weight)
            names = list(fits)
            # Per sample, the fit whose features match that sample's observation better.
            per_sample = torch.stack([sample_residuals(chain(stages), fits[k].x, observed) for k in names])
            choice = per_sample.argmin(0)
            images = torch.stack([fits[k].x for k in names])[choice, torch.arange(len(choice))]
            diagnostics.update({"refine_start": [names[i] for i in choice.tolist()],
                                "refined_residual": relative_residual(chain(stages), images, observed),
                                "refine_residuals": {k: f.residual for k, f in fits.items()},
                                "refine_seconds": sum(f.seconds for f in fits.values())})
            diagnostics["iterations"] += sum(f.iterations for f in fits.values())
        diagnostics["seconds"] = time.perf_counter() - start
        return Reconstruction(images.to(features.dtype), diagnostics,
                              {"blockwise": blockwise.to(features.dtype)} if self.refine else {})

    def _refine_adaptive(self, stages: list[Stage], reading: DefenseReading, blockwise: torch.Tensor,
                         diagnostics: dict[str, Any]) -> torch.Tensor:
        """The refinement under the defense's reading; the start whose fit has the lower objective wins."""
        starts = {"blockwise": blockwise}
        if self.also_from_grey:
            starts["grey"] = torch.full_like(blockwise, 0.5)
        fits = {k: fit_image_adaptive(stages, reading, x0, self.refine_iter, self.tv_weight, self.tv_prior)
                for k, x0 in starts.items()}
        best = min(fits, key=lambda k: fits[k][1])
        diagnostics.update({"refine_start": best, "refined_residual": fits[best][0].residual,
                            "refine_residuals": {k: f.residual for k, (f, _) in fits.items()},
                            "refine_objectives": {k: v for k, (_, v) in fits.items()},
                            "refine_seconds": sum(f.seconds for f, _ in fits.values())})
        diagnostics["iterations"] += sum(f.iterations for f, _ in fits.values())
        return fits[best][0].x


def chain(stages: list[Stage]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The client half as the composition of its stages (BatchNorm folded)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = stage.forward(x)
        return x
    return forward


def fit_image(stages: list[Stage], observed: torch.Tensor, start: torch.Tensor, iterations: int,
              tv_weight: float = 0.0) -> FitResult:
    """End-to-end fit of the image through every stage from ``start`` (the refinement step)."""
    forward = chain(stages)
    data_loss = None
    if stages[-1].pre_relu is not None:
        head, last = chain(stages[:-1]), stages[-1].pre_relu
        data_loss = relu_consistency(lambda x: last(head(x)), observed)
    regulariser = (lambda x: tv_weight * total_variation(x)) if tv_weight > 0 else None
    return fit_input(forward, observed, start, lower=0.0, upper=1.0, max_iter=iterations,
                     regulariser=regulariser, data_loss=data_loss)


@torch.no_grad()
def stage_outputs(stages: list[Stage], images: torch.Tensor) -> list[torch.Tensor]:
    """The true output of every stage for ``images``."""
    outputs, x = [], images
    for stage in stages:
        x = stage.forward(x)
        outputs.append(x)
    return outputs


@torch.no_grad()
def true_input_errors(stages: list[Stage], recovered: list[torch.Tensor], truth: torch.Tensor) -> list[float]:
    """Relative error ||x̂_i - x_i|| / ||x_i|| of each stage's recovered input against the true one."""
    errors, x = [], truth
    for stage, estimate in zip(stages, recovered):
        errors.append(float((estimate - x).norm() / x.norm().clamp_min(1e-30)))
        x = stage.forward(x)
    return errors
