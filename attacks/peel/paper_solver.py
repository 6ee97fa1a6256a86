"""The PEEL paper's per-block formulation, solved as the authors did (for faithful comparison).

For a block ``y = S(x) + W_k·ReLU(... ReLU(W_1·x))`` every hidden pre-activation is split into
``W_j·h_{j-1} = p_j - n_j`` with ``p_j, n_j >= 0`` and ``p_j ⊙ n_j = 0``, so ``ReLU(W_j·h) = p_j``
(and ``PReLU(W_j·h) = p_j - a·n_j`` for a PReLU with slope ``a``).
The variables ``x, p, n`` start at ``1e-3·N(0, 1)`` and are fitted with Adam (lr 0.01, 1000
iterations) on the output error plus both constraints with a fixed penalty weight of 100;
``p, n >= 0`` (and the input bounds) are kept by projection after every step.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from leakbench.attacks.optim import project, relative_residual
from leakbench.attacks.peel.stages import Stage

PAPER_LR = 0.01
PAPER_ITERATIONS = 1000
PAPER_PENALTY = 100.0
PAPER_INIT_SCALE = 1e-3


def _negative_slope(act: object, like: torch.Tensor) -> torch.Tensor | float:
    """0 for ReLU; the (per-channel) slope for a PReLU, shaped to broadcast over ``like``."""
    if isinstance(act, torch.nn.PReLU):
        w = act.weight.detach()
        return w.view(1, -1, *([1] * (like.dim() - 2))) if w.numel() > 1 else w
    return 0.0


def invert_stage_paper(stage: Stage, y: torch.Tensor, *, lower: float | None = None, upper: float | None = None,
                       iterations: int = PAPER_ITERATIONS, lr: float = PAPER_LR, penalty: float = PAPER_PENALTY,
                       seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Solve one stage with the paper's (x, p, n) formulation; layer groups (the stem) get the same
    optimiser on the plain output error, since the paper's split applies to residual branches."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)

    def noise(shape: tuple[int, ...]) -> torch.Tensor:  # drawn on the CPU: the same start on every device
        return (PAPER_INIT_SCALE * torch.randn(shape, generator=g, dtype=y.dtype, device="cpu")
                ).to(y.device).requires_grad_(True)

    x = noise((y.shape[0], *stage.input_shape))
    hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
    if stage.kind == "block":
        with torch.no_grad():
            h = x
            for layer, act in zip(stage.layers[:-1], stage.activations):
                h = layer(h)
                hidden.append((noise(tuple(h.shape)), noise(tuple(h.shape))))
                h = act(h)
    params = [x] + [t for pair in hidden for t in pair]
    optimizer = torch.optim.Adam(params, lr=lr)

    for _ in range(iterations):
        optimizer.zero_grad()
        if stage.kind == "block":
            loss = y.new_zeros(())
            h = x
            for layer, act, (p, n) in zip(stage.layers[:-1], stage.activations, hidden):
                split = layer(h) - p + n
                loss = loss + penalty * (split.pow(2).mean() + (p * n).pow(2).mean())
                h = p - _negative_slope(act, p) * n
            z = (x if stage.shortcut is None else stage.shortcut(x)) + stage.layers[-1](h)
            out = torch.relu(z) if stage.post_relu else z
            loss = loss + F.mse_loss(out, y)
        else:
            loss = F.mse_loss(stage.forward(x), y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(project(x, lower, upper))
            for p, n in hidden:
                p.clamp_(min=0)
                n.clamp_(min=0)

    result = x.detach()
    return result, {"stage": stage.name, "kind": stage.description[0] if stage.kind == "block" else "layers",
                    "solver": "paper", "fixed_point_iterations": 0, "lbfgs_iterations": 0,
                    "adam_iterations": iterations, "evaluations": [iterations] * len(y),
                    "residual": relative_residual(stage.forward, result, y),
                    "seconds": time.perf_counter() - start}
