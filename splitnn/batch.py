"""Per-sample tensor helpers: dimension 0 is the sample, and each sample is its own problem."""
from __future__ import annotations

import torch


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1), to broadcast one value per sample against ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def sample_norms(t: torch.Tensor) -> torch.Tensor:
    """Each sample's L2 norm, shaped (N,)."""
    return t.flatten(1).norm(dim=1)
