"""The split model: client half, an optional defense at the cut, server half."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SplitModel(nn.Module):
    """``server(defense(client(x)))``. The defense, if any, is a transform applied to the features."""

    def __init__(self, client: nn.Module, server: nn.Module,
                 defense: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.client = client
        self.server = server
        self.defense = defense

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the server receives: the client's output after the defense."""
        f = self.client(x)
        return self.defense(f) if self.defense is not None else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.features(x))
