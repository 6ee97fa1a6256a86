"""Fit an input so a known function reproduces an observed output: the solver rMLE and PEEL share."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.optimize
import torch
from threadpoolctl import threadpool_limits

from attacks.box_lbfgs import minimize_box, project
from splitnn.batch import per_sample, sample_norms

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    x: torch.Tensor
    iterations: int
    residual: float       # ||f(x) - y|| / ||y|| after projection onto the bounds
    seconds: float


def relative_residual(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((forward(x) - target).norm() / target.norm().clamp_min(1e-30))


@torch.no_grad()
def sample_residuals(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's relative residual ||f(x_b) - y_b|| / ||y_b||, shaped (B,)."""
    return sample_norms(forward(x) - target) / sample_norms(target).clamp_min(1e-30)


def relu_active(target: torch.Tensor, zero_tol: float = 1e-5) -> torch.Tensor:
    """Entries of a post-ReLU target that are positive; those below ``zero_tol · max|y|`` (per sample) count
    as zeros, since a target recovered by an earlier solve (or sent in float32) has tiny positive values
    where the true activation was exactly zero."""
    scale = per_sample(target.flatten(1).abs().amax(dim=1), target)
    return target > zero_tol * scale  # per sample, so samples stay independent


def relu_violation(pre_activation: Forward, x: torch.Tensor, target: torch.Tensor) -> float:
    """How far ``x`` breaks the post-ReLU zeros: ||max(z, 0)|| over the entries where ``y`` is zero, relative
    to ||y||."""
    with torch.no_grad():
        z = pre_activation(x)
        broken = torch.where(relu_active(target), torch.zeros_like(z), z.clamp_min(0))
        return float(broken.norm() / target.norm().clamp_min(1e-30))


def relu_consistency(pre_activation: Forward, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``0.5·||ReLU(z(x)) - y||²`` per sample, written so that it stays smooth where the solution lies.

    Where ``y > 0`` the pre-activation must equal ``y`` (a plain square, which keeps its
    gradient even while ``z < 0``); where ``y == 0`` (see ``relu_active``) it only has to be
    ``<= 0`` (a one-sided square, i.e. the post-ReLU zeros as inequality constraints).
    """
    active = relu_active(target)

    def loss(x: torch.Tensor) -> torch.Tensor:
        z = pre_activation(x)
        return 0.5 * torch.where(active, z - target, z.clamp_min(0)).pow(2).flatten(1).sum(1)
    return loss


def fit_input(forward: Forward, target: torch.Tensor, x0: torch.Tensor, *, lower: float | None = None,
              upper: float | None = None, max_iter: int = 500, regulariser: Callable[[torch.Tensor], torch.Tensor]
              | None = None, data_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
              method: str = "scipy") -> FitResult:
    """Minimise ``0.5·||f(x) - y||² (+ regulariser(x))`` over ``x`` in the box, from ``x0``.

    ``data_loss`` replaces the squared error when given (e.g. ``relu_consistency``). Both keep ``x``
    inside the bounds exactly:

    - ``method="scipy"``: SciPy's L-BFGS-B on the whole batch at once (its loss is a sum of per-sample
      terms, so samples do not interact in the objective, but they share the line search);
    - ``method="torch"``: ``attacks.box_lbfgs``, one independent problem per sample, with no per-call
      cost per variable (SciPy's bounds handling dominates short solves on feature maps). Here
      ``data_loss`` and ``regulariser`` must give one value per sample.

    ``residual`` is ``||f(x) - y|| / ||y||``.
    """
    if method == "torch":
        return _fit_input_torch(forward, target, x0, lower, upper, max_iter, regulariser, data_loss)
    if method != "scipy":
        raise ValueError(f"method: got {method!r}, expected 'scipy' or 'torch'")
    start = time.perf_counter()
    x_start = project(x0.detach(), lower, upper)
    shape, dtype = x_start.shape, x_start.dtype
    # Scale the loss by 1/||y||² so SciPy's stopping tolerances mean the same at any feature scale:
    # it stops once the relative residual stops improving at about the 1e-9 level.
    scale = 1.0 / max(float(target.pow(2).sum()), 1e-30)

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.from_numpy(flat).view(shape).to(dtype).requires_grad_(True)
        loss = data_loss(x).sum() if data_loss is not None else 0.5 * (forward(x) - target).pow(2).sum()
        if regulariser is not None:
            loss = loss + regulariser(x).sum()
        loss = loss * scale
        (grad,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), grad.detach().double().reshape(-1).numpy()

    iterations = 0
    result = x_start
    if max_iter > 0:
        bounds = None if lower is None and upper is None else scipy.optimize.Bounds(
            -np.inf if lower is None else lower, np.inf if upper is None else upper)
        # One BLAS thread for SciPy: its idle OpenBLAS threads otherwise spin against torch's (10x slower).
        with threadpool_limits(1, user_api="blas"):
            solution = scipy.optimize.minimize(
                objective, x_start.double().reshape(-1).numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
                options={"maxiter": max_iter, "maxfun": int(max_iter * 1.5) + 10, "maxcor": 20,
                         "ftol": 1e-19, "gtol": 1e-13})
        iterations = int(solution.nit)
        result = torch.from_numpy(solution.x).view(shape).to(dtype)
    return FitResult(result, iterations, relative_residual(forward, result, target), time.perf_counter() - start)


def _fit_input_torch(forward: Forward, target: torch.Tensor, x0: torch.Tensor, lower: float | None,
                     upper: float | None, max_iter: int, regulariser: Callable[[torch.Tensor], torch.Tensor] | None,
                     data_loss: Callable[[torch.Tensor], torch.Tensor] | None) -> FitResult:
    start = time.perf_counter()
    # Each sample's loss relative to its own ||y||², so the stopping tolerances mean the same at any scale.
    scale = 1.0 / target.pow(2).flatten(1).sum(1).clamp_min(1e-30)

    def loss(x: torch.Tensor) -> torch.Tensor:
        value = data_loss(x) if data_loss is not None else 0.5 * (forward(x) - target).pow(2).flatten(1).sum(1)
        if regulariser is not None:
            value = value + regulariser(x)
        return value * scale

    x, iterations = (minimize_box(loss, x0, lower=lower, upper=upper, max_iter=max_iter) if max_iter > 0
                     else (project(x0.detach(), lower, upper), torch.zeros(1, dtype=torch.long)))
    return FitResult(x, int(iterations.max()), relative_residual(forward, x, target), time.perf_counter() - start)
