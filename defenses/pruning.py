"""Feature pruning: zero a fraction of the channels at the cut, chosen once on training data by a score
(random, activation magnitude, or a Captum attribution of the task objective to the cut)."""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from leakbench.defenses.base import FeatureDefense
from leakbench.defenses.registry import register
from leakbench.splitnn import devices
from leakbench.splitnn.lazy_images import Images, LazyMap, is_lazy
from leakbench.splitnn.params import Count, Fraction, Positive, PositiveCount, Seed

Score = Literal["random", "magnitude", "conductance", "grad_x_activation"]


class _Joined(nn.Module):
    """client -> server, returning what the attribution explains: the per-sample task loss or the logits."""

    def __init__(self, client: nn.Module, server: nn.Module, objective: str):
        super().__init__()
        self.client, self.server, self.objective = client, server, objective

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.server(self.client(x))
        if self.objective == "loss":
            return F.cross_entropy(logits, y, reduction="none")
        return logits


@register("pruning")
class Pruning(FeatureDefense):
    """Zeroes the ``floor(ratio * C)`` channels (of C at the cut) with the lowest score, i.e. those the task
    needs least, computed once by ``fit`` on ``samples`` training images.

    ``score``: ``random``, ``magnitude`` (mean |activation|), ``conductance`` (Captum LayerConductance) or
    ``grad_x_activation`` (Captum LayerGradientXActivation), of the task loss (``objective="loss"``) or
    the true-class logit (``"logit"``); a channel's score is its mean |attribution|.
    ``finetune_server > 0`` fine-tunes a copy of the server half on pruned features for that many epochs.
    """

    needs_fit = True
    strength_zero = {"ratio": 0.0}

    def __init__(self, ratio: Fraction = 0.5, score: Score = "magnitude", objective: Literal["loss", "logit"] = "loss",
                 samples: PositiveCount = 256, n_steps: Annotated[int, Field(ge=2)] = 16, finetune_server: Count = 0,
                 finetune_lr: Positive = 0.01, seed: Seed = 0):
        super().__init__(seed)
        self.ratio, self.score, self.objective, self.samples = ratio, score, objective, samples
        self.n_steps, self.finetune_server, self.finetune_lr = n_steps, finetune_server, finetune_lr
        self.scores: torch.Tensor | None = None
        self.removed: list[int] | None = None

    # ------------------------------------------------------------ scoring

    def channel_scores(self, client: nn.Module, server: nn.Module, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
        """One score per channel at the cut (higher = more useful to the task), on ``(x, y)``."""
        client.eval()
        server.eval()
        if self.score == "random":
            with torch.no_grad():
                channels = client(x[:1]).shape[1]
            return torch.rand(channels, generator=torch.Generator().manual_seed(self.seed))
        if self.score == "magnitude":
            with torch.no_grad():
                magnitude = sum(_channel_mean(client(x[i:i + 64]).abs()) * len(x[i:i + 64])
                                for i in range(0, len(x), 64))
            return cast(torch.Tensor, magnitude) / len(x)  # x is not empty: a tensor, never sum's start 0
        from captum.attr import LayerConductance, LayerGradientXActivation

        joined = _Joined(client, server, self.objective)
        if self.score == "conductance":
            method = LayerConductance(joined, client)
        else:
            method = LayerGradientXActivation(joined, client)
        total: torch.Tensor | None = None
        for i in range(0, len(x), 32):
            xb, yb = x[i:i + 32], y[i:i + 32]
            kwargs: dict[str, Any] = {"additional_forward_args": (yb,),
                                      "target": None if self.objective == "loss" else yb}
            if self.score == "conductance":
                kwargs.update(n_steps=self.n_steps, internal_batch_size=256)
            attribution = method.attribute(xb, **kwargs)
            part = _channel_mean(attribution.detach().abs()) * len(xb)
            total = part if total is None else total + part
        return cast(torch.Tensor, total) / len(x)  # x is not empty

    def fit(self, client: nn.Module, server: nn.Module, x_train: Images,
            y_train: torch.Tensor) -> nn.Module:
        """Score the channels on a seeded subset of the training data, choose the ones to remove, and
        return the server half (a fine-tuned copy when ``finetune_server > 0``). Training images decoded on
        demand give their pruned features batch by batch, as the fine-tuning asks for them."""
        generator = torch.Generator().manual_seed(self.seed)
        index = torch.randperm(len(x_train), generator=generator)[: self.samples]
        device = devices.of(client)  # the sample is drawn on the CPU, scored on the client's device
        self.scores = self.channel_scores(client, server, x_train[index].to(device), y_train[index].to(device)).float()
        k = int(self.ratio * len(self.scores))
        order = torch.sort(self.scores, stable=True).indices
        self.removed = sorted(order[:k].tolist())
        self.report = {"removed_channels": self.removed, "channels": len(self.scores),
                       "scores": [round(float(s), 8) for s in self.scores]}
        if self.finetune_server == 0 or k == 0:
            return server
        from leakbench.splitnn.training import fit

        features: Any
        if is_lazy(x_train):
            features = LazyMap(x_train, torch.no_grad()(lambda xb: self.transform(client(xb.to(device)))))
        else:
            with torch.no_grad():
                features = torch.cat([self.transform(client(x_train[i:i + 256].to(device)))
                                      for i in range(0, len(x_train), 256)])
        tuned = copy.deepcopy(server)
        fit(tuned, features, y_train, epochs=self.finetune_server, lr=self.finetune_lr, batch_size=64,
            weight_decay=5e-4, seed=self.seed, progress=False)
        return tuned.eval()

    def mask(self, features: torch.Tensor) -> torch.Tensor:
        """1 for kept channels, 0 for removed ones, shaped to broadcast against ``features``."""
        assert self.scores is not None and self.removed is not None
        if features.shape[1] != len(self.scores):
            raise ValueError(f"pruning was fitted on {len(self.scores)} channels, got features with "
                             f"{features.shape[1]}")
        keep = torch.ones(features.shape[1], dtype=features.dtype, device=features.device)
        keep[self.removed] = 0
        return keep.view(1, -1, *([1] * (features.dim() - 2)))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0:
            return features
        if self.removed is None:
            raise RuntimeError("pruning must be fitted first: call fit(client, server, x_train, y_train) "
                               "(the runner does this for you)")
        return features * self.mask(features)


def _channel_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the channel one (dim 1): (N, C, ...) -> (C,)."""
    dims = [d for d in range(values.dim()) if d != 1]
    return values.mean(dim=dims)
