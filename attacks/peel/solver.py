"""Per-stage inversion: warm start, fixed-point iteration where it applies, then an L-BFGS polish.

The polish is ``attacks.box_lbfgs`` (through ``fit_input``): batched per sample, bounds kept exactly, and
no per-variable setup cost, which with SciPy's L-BFGS-B dominated a block's solve.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from leakbench.attacks.optim import fit_input, project, sample_residuals
from leakbench.attacks.peel.stages import Stage, _block, shortcut_start
from leakbench.attacks.priors import least_norm, relu_consistency, relu_violation
from leakbench.splitnn.batch import per_sample, sample_norms


def fixed_point(stage: Stage, y: torch.Tensor, x: torch.Tensor, lower: float | None, upper: float | None,
                iterations: int, tol: float = 1e-12) -> tuple[torch.Tensor, int]:
    """Iterate ``x <- y - W2·ReLU(W1·x)`` on an identity-shortcut block (exact when the residual contracts).

    With a ReLU after the addition, entries with ``y > 0`` follow the same update; entries with
    ``y == 0`` only know ``x + r(x) <= 0``, so they move down to ``-r(x)`` if they violate it.
    Each sample keeps the iterate with its smallest forward residual seen and stops (is frozen) once
    that residual has not improved for 20 iterations (it does not contract there) or its step is below
    ``tol``, so a sample's result does not depend on the rest of the batch. Returns the most
    iterations any sample ran.
    """
    assert stage.residual is not None
    with torch.no_grad():
        best, best_res = x, sample_residuals(stage.forward, x, y)
        best_at = torch.zeros(len(x), dtype=torch.long, device=x.device)
        running = torch.ones(len(x), dtype=torch.bool, device=x.device)
        ran = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for done in range(1, iterations + 1):
            r = stage.residual(x)
            new = torch.where(y > 0, y - r, torch.minimum(x, -r)) if stage.post_relu else y - r
            new = torch.where(per_sample(running, x), project(new, lower, upper), x)
            converged = sample_norms(new - x) / sample_norms(x).clamp_min(1e-30) < tol
            running &= torch.isfinite(new).flatten(1).all(1)  # a diverged sample keeps its best iterate
            x = torch.where(per_sample(running, x), new, x)
            ran += running.long()
            check = running & ((done % 10 == 0) | converged)
            if check.any():
                res = sample_residuals(stage.forward, x, y)
                better = check & (res < best_res)
                best = torch.where(per_sample(better, x), x, best)
                best_res = torch.where(better, res, best_res)
                best_at = torch.where(better, done, best_at)
                running &= ~(check & ~better & (done - best_at >= 20))
            running &= ~converged
            if not running.any():
                break
    return best, int(ran.max()) if len(ran) else 0


def warm_start(stage: Stage, y: torch.Tensor, lower: float | None, upper: float | None) -> torch.Tensor:
    """Where the solver starts: the output itself through an identity shortcut (x ≈ y), the inverse of
    the shortcut alone through any other (see ``shortcut_start``), and mid-range (grey for an image)
    for layer groups."""
    if stage.kind == "block" and stage.identity_shortcut:
        x0 = y.clone()
    elif stage.kind == "block":
        x0 = shortcut_start(stage, y)
    else:
        fill = 0.5 * (lower + upper) if lower is not None and upper is not None else 0.0
        x0 = torch.full((y.shape[0], *stage.input_shape), fill, dtype=y.dtype, device=y.device)
    return project(x0, lower, upper)


def invert_stage(stage: Stage, y: torch.Tensor, *, lower: float | None = None, upper: float | None = None,
                 max_iter: int = 300, fixed_point_iters: int = 100, prior_weight: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Find ``x`` within the bounds with ``stage.forward(x) ≈ y``; returns it and the stage's diagnostics.

    ``prior_weight > 0`` is a least-norm prior on blocks with a ReLU after the addition: it adds
    ``0.5·prior_weight·||x||²`` to the data term ``0.5·||f(x) - y||²`` (both relative to ``||y||²``).
    There the output's zeros leave directions of ``x`` undetermined, and the target itself is only an
    estimate (recovered by the next block's solve), so an exact fit amplifies its error along the
    chain; the prior picks the small (sparse, like a post-ReLU activation) solution instead. Such blocks
    skip the fixed-point iteration, which solves the unregularised equation. The diagnostics' ``evaluations``
    are each sample's loss-and-gradient calls of this stage.
    """
    start = time.perf_counter()
    x = warm_start(stage, y, lower, upper)
    fp_iters = 0
    regularised = prior_weight > 0 and stage.post_relu
    # The fixed point solves the block's equation exactly; with the prior the solution is another one.
    if stage.identity_shortcut and fixed_point_iters > 0 and not regularised:
        x, fp_iters = fixed_point(stage, y, x, lower, upper, fixed_point_iters)
    data_loss = relu_consistency(stage.pre_relu, y) if stage.pre_relu is not None else None
    regulariser = least_norm(prior_weight) if regularised else None
    fit = fit_input(stage.forward, y, x, lower=lower, upper=upper, max_iter=max_iter, data_loss=data_loss,
                    regulariser=regulariser)
    violation = relu_violation(stage.pre_relu, fit.x, y) if stage.pre_relu is not None else 0.0
    return fit.x, {"stage": stage.name, "kind": stage.description[0] if stage.kind == "block" else "layers",
                   "fixed_point_iterations": fp_iters, "lbfgs_iterations": int(fit.iterations.max()),
                   "evaluations": fit.evaluations.tolist(),
                   "residual": fit.residual, "constraint_violation": violation,
                   "seconds": time.perf_counter() - start}


def invert_block(block: nn.Module, y: torch.Tensor, *, input_shape: tuple[int, ...] | None = None,
                 lower: float | None = None, dtype: torch.dtype = torch.float64, **solver: Any
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Invert one residual block on its own: the block input that reproduces output ``y``.

    ``input_shape`` (C, H, W) is needed only when the block changes the shape.
    """
    stage = _block(type(block).__name__, block.eval(), dtype)
    stage.input_shape = tuple(input_shape) if input_shape is not None else tuple(y.shape[1:])
    x, diag = invert_stage(stage, y.detach().to(dtype), lower=lower, **solver)
    return x, diag
