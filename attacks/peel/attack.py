"""PEEL (Arif et al., SaTML 2025): invert the client half block by block, from the cut back to the image."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from attacks.base import Attack, Knowledge, Reconstruction, require_image_shape
from attacks.peel.solver import invert_stage
from attacks.peel.stages import Stage, UnsupportedLayerError, build_stages, extract_stages
from attacks.registry import register
from splitnn.errors import check_choice, check_number


def stage_bounds(stages: list[Stage], index: int) -> tuple[float | None, float | None]:
    """Bounds on a stage's input: the image is in [0, 1]; after a ReLU the input is >= 0."""
    if index == 0:
        return 0.0, 1.0
    return (0.0 if stages[index - 1].output_nonnegative else None), None


@register("peel")
class PEEL(Attack):
    """Backward, block-by-block inversion of a residual client half.

    Each stage is solved on its own (warm start, fixed-point iteration on identity-shortcut
    blocks, then L-BFGS with the ReLU-implied bounds); its recovered input becomes the next
    stage's target. No end-to-end refinement: errors in one block carry into the next.
    """

    knowledge = frozenset({Knowledge.CLIENT_WEIGHTS})

    def __init__(self, max_iter: int = 300, fixed_point_iters: int = 100, dtype: str = "float64"):
        self.max_iter = check_number("max_iter", max_iter, low=0, integer=True)
        self.fixed_point_iters = check_number("fixed_point_iters", fixed_point_iters, low=0, integer=True)
        self.dtype = check_choice("dtype", dtype, ("float32", "float64"))

    @property
    def params(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter, "fixed_point_iters": self.fixed_point_iters, "dtype": self.dtype}

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        try:
            build_stages(client)
        except UnsupportedLayerError as exc:
            return False, str(exc)
        return True, ""

    def reconstruct(self, client: nn.Module, features: torch.Tensor, **ctx: Any) -> Reconstruction:
        shape = require_image_shape(ctx)
        dtype = getattr(torch, self.dtype)
        start = time.perf_counter()
        stages = extract_stages(client, shape, dtype)
        target = features.detach().to(dtype)
        stage_diagnostics: list[dict[str, Any]] = [{} for _ in stages]
        recovered: list[torch.Tensor] = [target] * len(stages)
        for index in reversed(range(len(stages))):
            lower, upper = stage_bounds(stages, index)
            target, stage_diagnostics[index] = invert_stage(
                stages[index], target, lower=lower, upper=upper, max_iter=self.max_iter,
                fixed_point_iters=self.fixed_point_iters)
            recovered[index] = target
        truth = ctx.get("truth")
        if truth is not None:  # evaluation only; never used to solve
            for diag, error in zip(stage_diagnostics, true_input_errors(stages, recovered, truth.to(dtype))):
                diag["true_input_error"] = error
        images = target.clamp(0.0, 1.0).to(features.dtype)
        return Reconstruction(images, {"stages": stage_diagnostics, "seconds": time.perf_counter() - start,
                                       "iterations": sum(d["lbfgs_iterations"] for d in stage_diagnostics)})


@torch.no_grad()
def true_input_errors(stages: list[Stage], recovered: list[torch.Tensor], truth: torch.Tensor) -> list[float]:
    """Relative error ||x̂_i - x_i|| / ||x_i|| of each stage's recovered input against the true one."""
    errors, x = [], truth
    for stage, estimate in zip(stages, recovered):
        errors.append(float((estimate - x).norm() / x.norm().clamp_min(1e-30)))
        x = stage.forward(x)
    return errors
