"""Data terms and priors that the fits share (plain, ReLU-consistent, masked and binned data terms; TV and
least-norm priors), each giving one value per sample (shape (B,)).

``attacks.box_lbfgs`` solves every sample as its own problem, so nothing here may sum over the batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from leakbench.splitnn.batch import per_sample

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


def tv_prior(weight: float) -> Loss | None:
    """``weight·TV(x)`` per sample, or ``None`` when the weight is 0 (no regulariser at all)."""
    return (lambda x: weight * total_variation(x)) if weight > 0 else None


def least_norm(weight: float | torch.Tensor, centre: torch.Tensor | None = None) -> Loss:
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


def masked_error(forward: Forward, released: torch.Tensor, target: torch.Tensor,
                 threshold: torch.Tensor | None = None) -> Loss:
    """``0.5·||f(x) - y||²`` over the ``released`` entries only; with ``threshold`` (top-k) the unreleased ones
    also pay ``0.5·(|f| - t)₊²``: what was dropped was no larger than what was kept."""
    def masked(x: torch.Tensor) -> torch.Tensor:
        f = forward(x)
        loss = 0.5 * sum_per_sample(torch.where(released, f - target, torch.zeros_like(f)).pow(2))
        if threshold is not None:
            excess = (f.abs() - threshold).clamp_min(0)
            loss = loss + 0.5 * sum_per_sample(torch.where(released, torch.zeros_like(f), excess).pow(2))
        return loss
    return masked


def masked_error_through_relu(pre_relu: Forward, released: torch.Tensor, target: torch.Tensor,
                              threshold: torch.Tensor | None = None) -> Loss:
    """``masked_error`` on the pre-activation z of a ReLU output f = max(z, 0), smooth while z < 0: a released
    positive value pins z; a released zero only says z <= 0; top-k's f <= t is z <= t (t >= 0)."""
    def masked(x: torch.Tensor) -> torch.Tensor:
        z = pre_relu(x)
        zero = torch.zeros_like(z)
        fit = torch.where(target > 0, z - target, z.clamp_min(0))
        loss = 0.5 * sum_per_sample(torch.where(released, fit, zero).pow(2))
        if threshold is not None:
            loss = loss + 0.5 * sum_per_sample(torch.where(released, zero, (z - threshold).clamp_min(0)).pow(2))
        return loss
    return masked


def binned_error(forward: Forward, centre: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                 outside_weight: float) -> Loss:
    """``0.5·(||f(x) - centre||² + outside_weight·||distance of f outside [low, high]||²)`` per sample."""
    def within_bins(x: torch.Tensor) -> torch.Tensor:
        f = forward(x)
        outside = sum_per_sample((low - f).clamp_min(0).pow(2) + (f - high).clamp_min(0).pow(2))
        return 0.5 * (sum_per_sample((f - centre).pow(2)) + outside_weight * outside)
    return within_bins


def binned_error_through_relu(pre_relu: Forward, centre: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                              outside_weight: float) -> Loss:
    """``binned_error`` on the pre-activation z of a ReLU output: a bin reaching down to zero also holds every
    z <= 0, so below such a bin nothing is paid."""
    above_zero = low > 0

    def within_bins(x: torch.Tensor) -> torch.Tensor:
        z = pre_relu(x)
        below = torch.where(above_zero, (low - z).clamp_min(0), torch.zeros_like(z))
        off_centre = torch.where(above_zero, z, z.clamp_min(0)) - centre
        outside = sum_per_sample(below.pow(2) + (z - high).clamp_min(0).pow(2))
        return 0.5 * (sum_per_sample(off_centre.pow(2)) + outside_weight * outside)
    return within_bins
