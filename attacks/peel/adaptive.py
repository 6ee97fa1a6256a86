"""Defense-aware PEEL's fits: a stage, or the image end to end, fitted under an observation model
(``attacks.peel.observation``) that a reader registered for the defense's class built
(``attacks.peel.readers``). The attacker reads a ``PublicDefense``, never the defense object and its random
state; every data term and prior gives one value per sample, so each sample is fitted on its own."""
from __future__ import annotations

import time
from typing import Any

import torch

from leakbench.attacks.optim import END_TO_END_HISTORY, MultiStartFit, fit_from_starts, fit_input
from leakbench.attacks.peel.chain import chain, pre_relu_forward
from leakbench.attacks.peel.observation import Exact
from leakbench.attacks.peel.readers import read_defense, register_reader
from leakbench.attacks.peel.solver import warm_start
from leakbench.attacks.peel.stages import Stage
from leakbench.attacks.priors import combined, relu_violation, squared_error

__all__ = ["invert_stage_adaptive", "read_defense", "refine_adaptive", "register_reader"]


def invert_stage_adaptive(stage: Stage, target: torch.Tensor, reading: Exact, *, at_cut: bool,
                          lower: float | None, upper: float | None, max_iter: int
                          ) -> tuple[torch.Tensor, dict[str, Any]]:
    """One stage under the reading: at the cut, the model's data term from a warm start on what it says of the
    clean features; behind the cut, a least squares with the model's stage prior (noise: pulled toward the warm
    start with weight s², since noise propagates back through the stages)."""
    start = time.perf_counter()
    seen = reading.cut_target(target) if at_cut else target  # noise: the noisy values; quantization: bin centres
    x0 = warm_start(stage, seen, lower, upper)
    if at_cut:  # the target is the observed features themselves
        data_loss = reading.data_loss(stage.forward, stage.pre_relu)
    else:
        data_loss = squared_error(stage.forward, target)
    regulariser = reading.stage_prior(target, x0)
    fit = fit_input(stage.forward, target, x0, lower=lower, upper=upper, max_iter=max_iter, data_loss=data_loss,
                    regulariser=regulariser)
    return fit.x, {"stage": stage.name, "kind": "adaptive " + reading.kind, "fixed_point_iterations": 0,
                   "lbfgs_iterations": int(fit.iterations.max()), "evaluations": fit.evaluations.tolist(),
                   "residual": fit.residual,
                   "constraint_violation": relu_violation(stage.pre_relu, fit.x, seen) if stage.pre_relu else 0.0,
                   "seconds": time.perf_counter() - start}


def refine_adaptive(stages: list[Stage], reading: Exact, starts: dict[str, torch.Tensor], *,
                    iterations: int, tv_weight: float, tv_prior: float, max_evals: int | None = None,
                    max_seconds: float | None = None) -> MultiStartFit:
    """End-to-end fits of the image through every stage under the reading, one per start; per sample the fit
    with the lower objective (data term plus prior) wins, since the bare residual rewards fitting the noise."""
    forward = chain(stages)
    prior = reading.image_prior(tv_weight, tv_prior)
    loss = reading.data_loss(forward, pre_relu_forward(stages))
    return fit_from_starts(forward, reading.observed, starts, score=combined(loss, prior), max_evals=max_evals,
                           max_seconds=max_seconds, lower=0.0, upper=1.0, max_iter=iterations, regulariser=prior,
                           data_loss=loss, history=END_TO_END_HISTORY)
