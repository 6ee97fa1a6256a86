"""Adversarial obfuscation at the cut (DeepObfuscator, Li et al., 2021; the adversarial-training defense GLASS and
SDAR evaluate against): the model trains on its task while a decoder adversary learns to reconstruct the input from
the cut features, and the client is pushed to make that adversary fail."""
from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from leakbench.defenses.base import TrainingDefense
from leakbench.defenses.nopeek import CutTap
from leakbench.defenses.registry import register
from leakbench.splitnn.params import NonNegative, Positive, PositiveCount, Seed
from leakbench.splitnn.split import split


class ReconstructionAdversary(nn.Module):
    """Features (C, h, w) -> conv -> transposed convs (x2 each, up to the image size) -> conv -> sigmoid: a small
    decoder to [0, 1] images, the proxy attacker the learned defenses train against. (``attacks.inverse_net`` has
    the attacker's own decoder; defenses sit below attacks and cannot import it.) No in-place ops (Opacus)."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, ...], hidden: int = 32):
        super().__init__()
        if len(feature_shape) != 3 or len(image_shape) != 3:
            raise ValueError(f"a reconstruction adversary needs spatial features (C, H, W) and images (C, H, W), "
                             f"got {tuple(feature_shape)} and {tuple(image_shape)}")
        size, height = feature_shape[1], image_shape[1]
        layers: list[nn.Module] = [nn.Conv2d(feature_shape[0], hidden, 3, padding=1), nn.ReLU()]
        while size * 2 <= height:  # undo the client's downsampling
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
            size *= 2
        layers.append(nn.Conv2d(hidden, image_shape[0], 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.image_hw = tuple(image_shape[1:])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.body(features)
        if tuple(x.shape[-2:]) != self.image_hw:
            x = F.interpolate(x, size=self.image_hw, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def seeded_adversary(feature_shape: tuple[int, ...], image_shape: tuple[int, ...], hidden: int, seed: int,
                     device: torch.device) -> ReconstructionAdversary:
    """The adversary initialised from ``seed`` alone (on the CPU, so the same on every device), moved to ``device``;
    the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        adversary = ReconstructionAdversary(feature_shape, image_shape, hidden)
    return adversary.to(device)


def adversary_step(adversary: nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor,
                   images: torch.Tensor) -> float:
    """One step of the adversary on the MSE of its reconstruction of ``images`` from ``features`` (detached: the
    model is not moved); its gradient set directly, so gradients the model's loss left on it do not leak in."""
    loss = F.mse_loss(adversary(features.detach()), images)
    grads = torch.autograd.grad(loss, list(adversary.parameters()))
    for parameter, grad in zip(adversary.parameters(), grads):
        parameter.grad = grad
    optimizer.step()
    return float(loss.detach())


def frozen_reconstruction_error(adversary: nn.Module, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The adversary's MSE on ``images``, differentiable in ``features`` only (its parameters taken detached)."""
    params = {name: p.detach() for name, p in adversary.named_parameters()}
    return F.mse_loss(functional_call(adversary, params, (features,)), images)


@register("adversarial")
class Adversarial(TrainingDefense):
    """Trains the model with ``cross_entropy - weight * MSE(adversary(client(x)), x)`` on every batch, against a
    decoder adversary trained at the same time to reconstruct the input from the features at the cut.

    Each batch alternates: first ``adversary_steps`` Adam steps (``adversary_lr``) of the adversary on this batch's
    features (detached), then the loop's step of the model, whose loss pays ``weight`` times the updated adversary's
    reconstruction MSE with a minus sign (the adversary's parameters are held fixed in that term). The adversary
    (``hidden`` channels, seeded by ``seed``) is the defense's training-time proxy and is discarded afterwards; the
    released features are the client's, as computed. MSE of [0, 1] images is at most 1, so the term is bounded.
    ``weight: 0`` is plain training exactly (no adversary is built). Threat model: the trained client is what an
    attacker sees; nothing is secret and it denies no knowledge. No formal guarantee.
    """

    uses_cut = True
    strength_zero = {"weight": 0.0}

    def __init__(self, weight: NonNegative = 1.0, hidden: PositiveCount = 32, adversary_lr: Positive = 1e-3,
                 adversary_steps: PositiveCount = 1, seed: Seed = 0):
        super().__init__(seed)
        self.weight, self.hidden = weight, hidden
        self.adversary_lr, self.adversary_steps = adversary_lr, adversary_steps
        self._adversary: ReconstructionAdversary | None = None
        self._adversary_optimizer: torch.optim.Optimizer | None = None
        self._errors: list[float] = []
        self._steps_per_epoch = 1

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int
             ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """At weight 0 the loop's own objects; else the model as client and server at the cut, tapped there, and
        the seeded adversary with its own optimizer (the loop's optimizer never sees it)."""
        if self.weight == 0:
            return model, optimizer, loader
        if self.cut is None:
            raise ValueError("adversarial needs the cut at which the adversary reads the features")
        client, server = split(model, self.cut)
        device = next(model.parameters()).device
        image = loader.dataset[0][0].unsqueeze(0).to(device)
        was_training = model.training
        model.eval()  # one image through the client for the feature shape, without touching BatchNorm statistics
        with torch.no_grad():
            feature_shape = tuple(client(image).shape[1:])
        model.train(was_training)
        self._adversary = seeded_adversary(feature_shape, tuple(image.shape[1:]), self.hidden, self.seed, device)
        self._adversary_optimizer = torch.optim.Adam(self._adversary.parameters(), lr=self.adversary_lr)
        self._errors, self._steps_per_epoch = [], max(1, len(loader))
        return CutTap(client, server), optimizer, loader

    def loss_term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  outputs: torch.Tensor) -> torch.Tensor | None:
        if self.weight == 0 or self._adversary is None:
            return None
        features = cast(torch.Tensor, cast(CutTap, model).features)  # this batch's, from wrap()'s module
        optimizer = cast(torch.optim.Optimizer, self._adversary_optimizer)
        for _ in range(self.adversary_steps):
            adversary_step(self._adversary, optimizer, features, x)
        error = frozen_reconstruction_error(self._adversary, features, x)
        self._errors.append(float(error.detach()))
        return -self.weight * error

    def finish(self, model: nn.Module) -> dict[str, Any]:
        self.report = {"cut": self.cut, "weight": self.weight}
        if self._adversary is not None:
            last = self._errors[-self._steps_per_epoch:] or [0.0]
            # the adversary's MSE after its step on each batch of the last epoch: how well it kept up
            self.report["final_epoch_adversary_mse"] = sum(last) / len(last)
        self._adversary, self._adversary_optimizer = None, None
        return dict(self.report)
