"""DISCO (Singh et al., "DISCO: Dynamic and Invariant Sensitive Channel Obfuscation for deep neural networks",
CVPR 2021): a small pruning network reads the features at the cut and removes, per sample, the channels that
carry most of what an adversary needs, trained min-max against that adversary while the task loss stays low."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.defenses.adversarial import adversary_step, frozen_reconstruction_error, seeded_adversary
from leakbench.defenses.base import FeatureDefense
from leakbench.defenses.registry import register
from leakbench.splitnn.lazy_images import Images
from leakbench.splitnn.params import Fraction, NonNegative, Positive, PositiveCount, Seed


class ChannelScorer(nn.Module):
    """DISCO's pruning network: features (C, H, W) -> conv -> ReLU -> global average -> linear: one score per channel
    and sample (higher = keep). No in-place ops (Opacus)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.linear = nn.Linear(hidden, channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(self.conv(features)).mean(dim=(2, 3)))


def top_channels(scores: torch.Tensor, removed: int) -> torch.Tensor:
    """The hard mask (N, C): 1 on each row's ``C - removed`` highest scores, 0 on the ``removed`` others."""
    keep = scores.shape[1] - removed
    return torch.zeros_like(scores).scatter(1, torch.topk(scores, keep, dim=1).indices, 1.0)


@register("disco")
class Disco(FeatureDefense):
    """Zeroes ``floor(ratio * C)`` of the C channels at the cut, chosen per sample by a learned pruning network (the
    ``C - floor(ratio * C)`` channels it scores highest are sent as computed, the rest are zeros). ``fit`` trains it
    min-max on ``samples`` training images, ``epochs`` epochs of batches of 64, alternating each batch: one Adam step
    (``adversary_lr``) of a decoder adversary reconstructing the image from the masked features (DISCO's proxy
    adversary, the sensitive attribute here being the image itself), then one Adam step (``lr``) of the pruning
    network on ``cross_entropy(server(masked)) - weight * MSE(adversary(masked), x)``. The hard top-k mask passes
    gradients to the scores straight through their sigmoid. ``ratio: 0`` is no defense (nothing is fitted, the
    features pass unchanged); ``weight: 0`` learns the mask for the task alone (the utility-only ablation).

    Why a fitted feature defense and not a training one: DISCO's pruner sits between client and server, so it can
    be learned on top of the plainly trained halves, and the client (what a white-box attacker inverts) stays the
    undefended model's, as for every other feature defense; the runner then compares like with like. By default the
    server is frozen (Shredder's protocol, as ``learned_noise``); ``train_server: true`` also trains a copy of it
    with the pruner, as DISCO trains its server jointly, and returns that copy. The client is never retrained, where
    DISCO also trains its encoder: this is DISCO's pruner and objective on a fixed client.

    How it differs from ``pruning``: ``pruning`` removes one fixed set of channels for every sample, chosen once by a
    task-utility score (magnitude or a Captum attribution); it never looks at an adversary. DISCO's mask is dynamic
    (a function of each sample's features) and learned against a reconstruction adversary.

    Threat model: the pruning network is the defense's secret state (a defense-aware attacker knows ``ratio``), but
    the removed channels are zero throughout the sample, so the mask can be read off what is released (as for
    ``pruning``, whose PEEL reader applies here too). Deterministic at inference: no fresh randomness per call.
    """

    needs_fit = True
    strength_zero = {"ratio": 0.0}

    def __init__(self, ratio: Fraction = 0.5, weight: NonNegative = 1.0, epochs: PositiveCount = 5,
                 lr: Positive = 1e-3, adversary_lr: Positive = 1e-3, hidden: PositiveCount = 32,
                 samples: PositiveCount = 2048, train_server: bool = False, seed: Seed = 0):
        super().__init__(seed)
        self.ratio, self.weight, self.epochs, self.lr, self.adversary_lr = ratio, weight, epochs, lr, adversary_lr
        self.hidden, self.samples, self.train_server = hidden, samples, train_server
        self.scorer: ChannelScorer | None = None

    def removed(self, channels: int) -> int:
        """How many of ``channels`` are zeroed per sample."""
        return int(self.ratio * channels)

    def mask(self, features: torch.Tensor) -> torch.Tensor:
        """Each sample's hard channel mask (N, C): 1 sent, 0 removed (exactly ``removed(C)`` zeros per row)."""
        if self.scorer is None:
            raise RuntimeError("disco must be fitted first: call fit(client, server, x_train, y_train) "
                               "(the runner does this for you)")
        if features.shape[1] != self.scorer.linear.out_features:
            raise ValueError(f"disco was fitted on {self.scorer.linear.out_features} channels, got features with "
                             f"{features.shape[1]}")
        scorer = self.scorer.to(features.device)
        with torch.no_grad():
            scores = scorer(features.float())
        return top_channels(scores, self.removed(features.shape[1])).to(features.dtype)

    def _soft_masked(self, scorer: ChannelScorer, features: torch.Tensor) -> torch.Tensor:
        """The masked features in training: the hard mask forward, the sigmoid of the scores backward."""
        scores = scorer(features)
        soft = torch.sigmoid(scores)
        mask = top_channels(scores.detach(), self.removed(features.shape[1])) + soft - soft.detach()
        return features * mask.view(*mask.shape, *([1] * (features.dim() - 2)))

    def fit(self, client: nn.Module, server: nn.Module, x_train: Images,
            y_train: torch.Tensor) -> nn.Module:
        """Learn the pruning network on a seeded subset of the training data (the client frozen; the server frozen,
        or a copy of it trained along when ``train_server``); returns the server half to use with it."""
        if self.ratio == 0:
            return server
        generator = torch.Generator().manual_seed(self.seed)
        index = torch.randperm(len(x_train), generator=generator)[:self.samples]
        client.eval()
        server.eval()
        with torch.no_grad():
            images = torch.cat([x_train[index[i:i + 256]] for i in range(0, len(index), 256)])
            clean = torch.cat([client(images[i:i + 256]) for i in range(0, len(images), 256)])
        labels = y_train[index]
        if clean.dim() != 4:
            raise ValueError(f"disco needs spatial features (N, C, H, W) at the cut, got {tuple(clean.shape)}")
        device = clean.device
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(self.seed)
            scorer = ChannelScorer(clean.shape[1], self.hidden)
        scorer = scorer.to(device)
        adversary = seeded_adversary(tuple(clean.shape[1:]), tuple(images.shape[1:]), self.hidden, self.seed + 1,
                                     device)
        tuned = copy.deepcopy(server).eval() if self.train_server else server  # eval: BatchNorm statistics stay
        trained = list(scorer.parameters()) + (list(tuned.parameters()) if self.train_server else [])
        optimizer = torch.optim.Adam(trained, lr=self.lr)
        adversary_optimizer = torch.optim.Adam(adversary.parameters(), lr=self.adversary_lr)
        task_losses, adversary_losses = [], []
        for _ in range(self.epochs):
            order = torch.randperm(len(clean), generator=generator)
            for i in range(0, len(order), 64):
                batch = order[i:i + 64]
                f, x, y = clean[batch], images[batch], labels[batch]
                masked = self._soft_masked(scorer, f)
                adversary_losses.append(adversary_step(adversary, adversary_optimizer, masked, x))
                task = F.cross_entropy(tuned(masked), y)
                loss = task - self.weight * frozen_reconstruction_error(adversary, masked, x)
                grads = torch.autograd.grad(loss, trained)  # only the pruner's (and the tuned server's) gradients
                for parameter, grad in zip(trained, grads):
                    parameter.grad = grad
                optimizer.step()
                task_losses.append(float(task.detach()))
        self.scorer = scorer.eval().requires_grad_(False)
        steps = max(1, len(task_losses) // self.epochs)
        self.report = {"channels": int(clean.shape[1]), "removed_per_sample": self.removed(clean.shape[1]),
                       "first_epoch_task_loss": round(sum(task_losses[:steps]) / steps, 4),
                       "last_epoch_task_loss": round(sum(task_losses[-steps:]) / steps, 4),
                       "last_epoch_adversary_mse": round(sum(adversary_losses[-steps:]) / steps, 5)}
        return tuned.requires_grad_(False) if self.train_server else server

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0:
            return features
        mask = self.mask(features)
        return features * mask.view(*mask.shape, *([1] * (features.dim() - 2)))
