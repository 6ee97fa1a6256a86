"""Fit an input so a known function reproduces an observed output: the solver every attack's fit goes through.

Every fit is ``attacks.box_lbfgs`` (one independent box-constrained L-BFGS problem per sample), so a sample's
result and its budget never depend on the rest of its batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from leakbench.attacks.box_lbfgs import minimize_box, project
from leakbench.attacks.priors import Forward, Loss, squared_error
from leakbench.splitnn.batch import sample_norms

__all__ = ["END_TO_END_HISTORY", "FitResult", "MultiStartFit", "fit_from_starts", "fit_input", "project",
           "relative_residual", "sample_residuals", "split_budget"]

#: L-BFGS memory of the end-to-end fits (rMLE, PEEL's refinement): SciPy's ``maxcor`` in the fits it replaced.
END_TO_END_HISTORY = 20


@dataclass
class FitResult:
    x: torch.Tensor
    iterations: torch.Tensor    # per sample, shape (B,)
    evaluations: torch.Tensor   # loss-and-gradient calls (forward + backward) per sample, shape (B,)
    residual: float             # ||f(x) - y|| / ||y|| over the batch, after projection onto the bounds
    seconds: float
    timed_out: bool = False


def relative_residual(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((forward(x) - target).norm() / target.norm().clamp_min(1e-30))


@torch.no_grad()
def sample_residuals(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's relative residual ||f(x_b) - y_b|| / ||y_b||, shaped (B,)."""
    return sample_norms(forward(x) - target) / sample_norms(target).clamp_min(1e-30)


def fit_input(forward: Forward, target: torch.Tensor, x0: torch.Tensor, *, lower: float | None = None,
              upper: float | None = None, max_iter: int = 500, regulariser: Loss | None = None,
              data_loss: Loss | None = None, max_evals: int | None = None, deadline: float | None = None,
              history: int = 10) -> FitResult:
    """Minimise ``0.5·||f(x) - y||² (+ regulariser(x))`` per sample over ``x`` in the box, from ``x0``.

    ``data_loss`` replaces the squared error when given (e.g. ``priors.relu_consistency``); it and
    ``regulariser`` give one value per sample. Each sample's objective is divided by its own ``||y||²``,
    so the stopping tolerances mean the same at any feature scale. ``max_evals`` caps each sample's
    evaluations, ``deadline`` (a ``time.perf_counter()`` value) the wall time.
    """
    start = time.perf_counter()
    scale = 1.0 / target.pow(2).flatten(1).sum(1).clamp_min(1e-30)
    data = data_loss if data_loss is not None else squared_error(forward, target)

    def loss(x: torch.Tensor) -> torch.Tensor:
        value = data(x)
        if regulariser is not None:
            value = value + regulariser(x)
        return value * scale

    result = minimize_box(loss, x0, lower=lower, upper=upper, max_iter=max_iter, history=history,
                          max_evals=max_evals, deadline=deadline)
    return FitResult(result.x, result.iterations, result.evaluations, relative_residual(forward, result.x, target),
                     time.perf_counter() - start, result.timed_out)


def split_budget(total: int | None, parts: int) -> list[int | None]:
    """``total`` evaluations shared by ``parts`` fits as evenly as possible (the first ones get the remainder)."""
    if total is None:
        return [None] * parts
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class MultiStartFit:
    """The per-sample winner of several fits: ``chosen[b]`` names the start whose fit sample ``b`` kept."""

    x: torch.Tensor
    chosen: list[str]
    fits: dict[str, FitResult]
    scores: dict[str, torch.Tensor]   # per start, each sample's score (lower wins)

    @property
    def iterations(self) -> torch.Tensor:
        """Per sample, the iterations of all its fits together."""
        return torch.stack([f.iterations for f in self.fits.values()]).sum(0)

    @property
    def evaluations(self) -> torch.Tensor:
        """Per sample, the evaluations of all its fits together (what the choice cost)."""
        return torch.stack([f.evaluations for f in self.fits.values()]).sum(0)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.fits.values())


def fit_from_starts(forward: Forward, target: torch.Tensor, starts: dict[str, torch.Tensor], *,
                    score: Callable[[torch.Tensor], torch.Tensor] | None = None, max_evals: int | None = None,
                    max_seconds: float | None = None, **fit: object) -> MultiStartFit:
    """``fit_input`` from each start in turn; per sample, the fit with the lowest ``score`` (default: its
    relative feature residual, which needs no ground truth) wins.

    ``max_evals`` (per sample) and ``max_seconds`` are shared by the starts: evaluations split evenly, and
    each start may use the time left divided by the starts still to run.
    """
    score = score or (lambda x: sample_residuals(forward, x, target))
    caps = split_budget(max_evals, len(starts))
    end = None if max_seconds is None else time.perf_counter() + max_seconds
    fits: dict[str, FitResult] = {}
    for i, (name, x0) in enumerate(starts.items()):
        deadline = None if end is None else time.perf_counter() + (end - time.perf_counter()) / (len(starts) - i)
        fits[name] = fit_input(forward, target, x0, max_evals=caps[i], deadline=deadline,
                               **fit)  # type: ignore[arg-type]
    names = list(fits)
    with torch.no_grad():
        scores = {k: score(fits[k].x) for k in names}
    choice = torch.stack([scores[k] for k in names]).argmin(0)
    x = torch.stack([fits[k].x for k in names])[choice, torch.arange(len(choice), device=choice.device)]
    return MultiStartFit(x, [names[i] for i in choice.tolist()], fits, scores)
