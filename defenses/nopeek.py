"""NoPeek (Vepakomma et al., 2019): train with the task loss plus ``alpha`` x the distance correlation
between each batch's inputs and its features at the cut, so the features carry less of the input."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense
from defenses.registry import register
from splitnn.params import NonNegative, Seed

if TYPE_CHECKING:
    from splitnn.training import TrainConfig


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


@register("nopeek")
class NoPeek(Defense):
    """Trains the model with ``cross_entropy + alpha * dCor(x, client(x))`` on every batch, the penalty
    taken at the cell's cut; ``alpha=0`` is plain training. No formal guarantee."""

    kind = "training"
    uses_cut = True

    def __init__(self, alpha: NonNegative = 1.0, seed: Seed = 0):
        super().__init__(seed)
        self.alpha = alpha

    def train_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: "TrainConfig",
                    cut: str | None = None, progress: bool = True) -> dict[str, Any]:
        from splitnn.split import split
        from splitnn.training import fit

        if cut is None:
            raise ValueError("nopeek needs the cut at which to penalise the features")
        # Both halves share the model's modules, so fit()'s model.train()/eval() switches them too.
        client, server = split(model, cut)
        penalties: list[float] = []

        def loss(_: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            features = client(xb)
            penalty = distance_correlation(xb, features)
            penalties.append(float(penalty.detach()))
            return F.cross_entropy(server(features), yb) + self.alpha * penalty

        fit(model, x, y, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
            weight_decay=config.weight_decay, seed=config.seed, progress=progress, loss=loss)
        last = penalties[-max(1, len(penalties) // max(1, config.epochs)):] if penalties else [0.0]
        return {"cut": cut, "alpha": self.alpha, "final_epoch_dcor": sum(last) / len(last)}
