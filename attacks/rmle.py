"""rMLE (He, Zhang & Lee, ACSAC 2019): optimise the image so the client's output matches the features."""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from attacks.base import Attack, Knowledge, Reconstruction, require_image_shape
from attacks.optim import fit_input
from attacks.registry import register
from splitnn.errors import check_choice, check_number


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation summed over each image, then over the batch."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()


@register("rmle")
class RMLE(Attack):
    """White-box regularised maximum-likelihood estimation: argmin_x ||client(x) - f||² + λ·TV(x), x in [0, 1].

    Solved with L-BFGS from a grey image (``dtype`` float64 by default for precision).
    """

    knowledge = frozenset({Knowledge.CLIENT_WEIGHTS})

    def __init__(self, iterations: int = 500, tv_weight: float = 0.0, init: str = "gray",
                 dtype: str = "float64"):
        self.iterations = check_number("iterations", iterations, low=1, integer=True)
        self.tv_weight = float(check_number("tv_weight", tv_weight, low=0))
        self.init = check_choice("init", init, ("gray", "zeros"))
        self.dtype = check_choice("dtype", dtype, ("float32", "float64"))

    @property
    def params(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "tv_weight": self.tv_weight, "init": self.init,
                "dtype": self.dtype}

    def reconstruct(self, client: nn.Module, features: torch.Tensor, **ctx: Any) -> Reconstruction:
        shape = require_image_shape(ctx)
        dtype = getattr(torch, self.dtype)
        start = time.perf_counter()
        model = copy.deepcopy(client).eval().to(dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        target = features.detach().to(dtype)
        x0 = torch.full((features.shape[0], *shape), 0.5 if self.init == "gray" else 0.0, dtype=dtype)
        regulariser = (lambda x: self.tv_weight * total_variation(x)) if self.tv_weight > 0 else None
        fit = fit_input(model, target, x0, lower=0.0, upper=1.0, max_iter=self.iterations,
                        regulariser=regulariser)
        return Reconstruction(fit.x.to(features.dtype), {
            "iterations": fit.iterations, "residual": fit.residual, "seconds": time.perf_counter() - start})
