"""Data terms and priors that the fits share, each giving one value per sample (shape (B,)).

``attacks.box_lbfgs`` solves every sample as its own problem, so nothing here may sum over the batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from splitnn.batch import per_sample

Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor], torch.Tensor]   # x (B, ...) -> (B,)


def sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    """Each sample's sum of ``t``, shaped (B,)."""
    return t.flatten(1).sum(1)


def squared_error(forward: Forward, target: torch.Tensor) -> Loss:
    """``0.5·||f(x) - y||²`` per sample: the plain data term."""
    return lambda x: 0.5 * sum_per_sample((forward(x) - target).pow(2))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of each image, shaped (B,)."""
    return (sum_per_sample((x[..., 1:, :] - x[..., :-1, :]).abs())
            + sum_per_sample((x[..., :, 1:] - x[..., :, :-1]).abs()))


def least_norm(weight: float, centre: torch.Tensor | None = None) -> Loss:
    """``0.5·weight·||x - centre||²`` per sample (``weight`` a number or one per sample, shape (B,))."""
    def prior(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * weight * sum_per_sample((x if centre is None else x - centre).pow(2))
    return prior


def relu_active(target: torch.Tensor, zero_tol: float = 1e-5) -> torch.Tensor:
    """Entries of a post-ReLU target that are positive; those below ``zero_tol · max|y|`` (per sample) count
    as zeros, since a target recovered by an earlier solve (or sent in float32) has tiny positive values
    where the true activation was exactly zero."""
    scale = per_sample(target.flatten(1).abs().amax(dim=1), target)
    return target > zero_tol * scale  # per sample, so samples stay independent


def relu_consistency(pre_activation: Forward, target: torch.Tensor) -> Loss:
    """``0.5·||ReLU(z(x)) - y||²`` per sample, written so that it stays smooth where the solution lies.

    Where ``y > 0`` the pre-activation must equal ``y`` (a plain square, which keeps its
    gradient even while ``z < 0``); where ``y == 0`` (see ``relu_active``) it only has to be
    ``<= 0`` (a one-sided square, i.e. the post-ReLU zeros as inequality constraints).
    """
    active = relu_active(target)

    def loss(x: torch.Tensor) -> torch.Tensor:
        z = pre_activation(x)
        return 0.5 * sum_per_sample(torch.where(active, z - target, z.clamp_min(0)).pow(2))
    return loss


def relu_violation(pre_activation: Forward, x: torch.Tensor, target: torch.Tensor) -> float:
    """How far ``x`` breaks the post-ReLU zeros: ||max(z, 0)|| over the entries where ``y`` is zero, relative
    to ||y|| (a diagnostic over the batch)."""
    with torch.no_grad():
        z = pre_activation(x)
        broken = torch.where(relu_active(target), torch.zeros_like(z), z.clamp_min(0))
        return float(broken.norm() / target.norm().clamp_min(1e-30))


def combined(data: Loss, *priors: Loss | None) -> Loss:
    """The data term plus every prior that is given."""
    used = [p for p in priors if p is not None]
    if not used:
        return data
    return lambda x: data(x) + sum(p(x) for p in used)
