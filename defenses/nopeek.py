"""NoPeek (Vepakomma et al., 2019): train with the task loss plus ``alpha`` x the distance correlation
between each batch's inputs and its features at the cut, so the features carry less of the input."""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from leakbench.defenses.base import TrainingDefense
from leakbench.defenses.registry import register
from leakbench.splitnn.params import NonNegative, Seed
from leakbench.splitnn.split import split


def _centered_distances(x: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distance matrix of the rows of ``x`` (n, d)."""
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sample distance correlation (Székely et al. 2007; the V-statistic ``dcor.distance_correlation``
    computes) between the flattened samples of ``x`` and ``y``; differentiable, in [0, 1]."""
    a = _centered_distances(x.flatten(1).to(torch.promote_types(x.dtype, torch.float32)))
    b = _centered_distances(y.flatten(1).to(a.dtype))
    dcov_xy = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    return (dcov_xy.clamp_min(0) / dvar.sqrt().clamp_min(eps)).clamp_min(eps).sqrt()


class CutTap(nn.Module):
    """``server(client(x))`` (exactly the model's output) that keeps the features at the cut of its last call: a
    training defense's wrapped model, whose loss term then reads this batch's features without a second pass."""

    def __init__(self, client: nn.Module, server: nn.Module):
        super().__init__()
        self.client, self.server = client, server
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = self.client(x)
        return self.server(self.features)


@register("nopeek")
class NoPeek(TrainingDefense):
    """Trains the model with ``cross_entropy + alpha * dCor(x, client(x))`` on every batch, the penalty
    taken at the cell's cut (one forward pass: the loop's model is tapped at the cut); ``alpha=0`` is plain
    training. No formal guarantee."""

    uses_cut = True
    strength_zero = {"alpha": 0.0}

    def __init__(self, alpha: NonNegative = 1.0, seed: Seed = 0):
        super().__init__(seed)
        self.alpha = alpha
        self._penalties: list[float] = []
        self._steps_per_epoch = 1

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int
             ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """The model as client and server halves at the cut (sharing its modules), tapped there."""
        if self.cut is None:
            raise ValueError("nopeek needs the cut at which to penalise the features")
        self._penalties, self._steps_per_epoch = [], max(1, len(loader))
        return CutTap(*split(model, self.cut)), optimizer, loader

    def loss_term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  outputs: torch.Tensor) -> torch.Tensor | None:
        # the loop's model is the CutTap that wrap() returned, its features those of this batch's forward pass
        penalty = distance_correlation(x, cast(torch.Tensor, model.features))
        self._penalties.append(float(penalty.detach()))
        return self.alpha * penalty

    def finish(self, model: nn.Module) -> dict[str, Any]:
        last = self._penalties[-self._steps_per_epoch:] or [0.0]
        self.report = {"cut": self.cut, "alpha": self.alpha, "final_epoch_dcor": sum(last) / len(last)}
        return dict(self.report)
