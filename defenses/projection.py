"""A fixed random projection at the cut, the zero-cost baseline: a seeded random rotation of the channels (a
1x1 linear map), optionally keeping k of the C rotated channels, with the server fine-tuned cheaply to the new
basis through a learned 1x1 adapter in front of it."""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from leakbench.defenses.base import FeatureDefense, sampled_features
from leakbench.defenses.registry import register
from leakbench.splitnn.datasets import Images
from leakbench.splitnn.params import Count, Positive, PositiveCount, Seed

Unit = Annotated[float, Field(ge=0, le=1)]


def haar_rotation(channels: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random rotation of R^channels (orthogonal, determinant +1), float64: QR of a Gaussian matrix with
    the signs fixed (Mezzadri 2007), one column flipped if its determinant is -1."""
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.linalg.det(q) < 0:
        q = torch.cat([-q[:, :1], q[:, 1:]], dim=1)
    return q


def rotation_power(rotation: torch.Tensor, t: float) -> torch.Tensor:
    """``rotation ** t`` along the geodesic of SO(C) from the identity (t = 0) to ``rotation`` (t = 1): the
    eigenangles scaled by ``t``. Exact at both ends."""
    if t == 0:
        return torch.eye(len(rotation), dtype=rotation.dtype)
    if t == 1:
        return rotation.clone()
    values, vectors = torch.linalg.eig(rotation)
    scaled = torch.polar(torch.ones_like(values.real), t * torch.angle(values))
    return torch.linalg.solve(vectors.T, (vectors * scaled.unsqueeze(0)).T).T.real.to(rotation.dtype)


def mix_channels(matrix: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``matrix`` (out, in) applied to dimension 1 of (N, C, ...) features: a 1x1 convolution without bias."""
    return torch.einsum("oc,nc...->no...", matrix.to(features.dtype), features)


class ChannelAdapter(nn.Module):
    """The server's cheap fine-tuning: a learned 1x1 linear map over the channels (identity at the start) in
    front of the frozen server half, so the server learns the projected basis from labels alone."""

    def __init__(self, channels: int, server: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels))
        self.server = server

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.server(mix_channels(self.weight, features))


@register("random_projection")
class RandomProjection(FeatureDefense):
    """Sends ``M f``: the features' C channels mixed by a secret, seeded random matrix, the same at every
    position (a 1x1 convolution). ``M`` is the first ``k = ceil(keep * C)`` rows of ``R ** mix``, where ``R``
    is a Haar-random rotation of R^C drawn from the seed and ``R ** mix`` the rotation a fraction ``mix`` of the
    way from the identity to it; the other C - k channels are sent as zeros, so the features keep their shape.
    ``keep`` < 1 loses information (a random k-dimensional projection); ``keep`` = 1 loses none (a rotation).
    Strength 0 (``mix: 0, keep: 1``) is the identity.

    The server cannot use rotated features as they are, so ``fit`` trains a 1x1 channel adapter (identity at
    the start) in front of the frozen server on the projected features of ``samples`` training images and their
    labels, for ``finetune_epochs`` epochs of Adam at ``finetune_lr``: the server learns the new basis from
    labels, as it would in a real deployment, and is never told ``M``. ``finetune_epochs: 0`` keeps the
    server as it was (what the projection costs untuned).

    Threat model. ``M`` is the defense's random state: a defense-aware attacker gets the kind and the public
    parameters (``mix``, ``keep``, never ``seed`` or ``M``; ``contracts.PublicDefense``). It denies no
    knowledge (``denies`` is empty): an attacker that knows the client's weights still knows them, and the cell
    runs; it receives features in an unknown basis of the channel space, so a white-box inversion of the known
    client (PEEL, rMLE) fits the wrong features and fails, which is what the cell measures. The projection is
    obscurity, not information loss (at ``keep: 1``): an attacker with query access learns through it (the query
    oracle runs the same ``M``), one holding the fine-tuned server holds an adapter near ``M``'s inverse, and
    one with auxiliary data could estimate ``M`` by matching feature moments (not implemented here). It is the
    baseline a learned defense must beat.
    """

    needs_fit = True
    strength_zero = {"mix": 0.0, "keep": 1.0}

    def __init__(self, mix: Unit = 1.0, keep: Annotated[float, Field(gt=0, le=1)] = 1.0,
                 finetune_epochs: Count = 5, finetune_lr: Positive = 0.01, samples: PositiveCount = 2048,
                 seed: Seed = 0):
        super().__init__(seed)
        self.mix, self.keep = mix, keep
        self.finetune_epochs, self.finetune_lr, self.samples = finetune_epochs, finetune_lr, samples
        self.matrix: torch.Tensor | None = None

    @property
    def identity(self) -> bool:
        return self.mix == 0 and self.keep == 1

    def projection(self, channels: int) -> torch.Tensor:
        """The (C, C) matrix ``M`` this seed gives at ``channels`` channels, float64: kept rows of ``R ** mix``,
        zero rows after them."""
        generator = torch.Generator().manual_seed(self.seed)
        rotation = rotation_power(haar_rotation(channels, generator), self.mix)
        kept = max(1, math.ceil(self.keep * channels))
        rows = torch.arange(channels).unsqueeze(1) < kept
        return torch.where(rows, rotation, torch.zeros_like(rotation))

    def fit(self, client: nn.Module, server: nn.Module, x_train: Images,
            y_train: torch.Tensor) -> nn.Module:
        """Draw ``M`` for the cut's channel count and return the server half to use: the server itself at
        strength 0 or with no fine-tuning, else the trained adapter in front of it (the server stays frozen)."""
        clean, labels, generator = sampled_features(client, server, x_train, y_train, self.samples, self.seed)
        self.matrix = self.projection(clean.shape[1])
        self.report = {"channels": clean.shape[1], "kept_channels": int(self.matrix.abs().sum(dim=1).gt(0).sum())}
        if self.identity or self.finetune_epochs == 0:
            return server
        projected = self.transform(clean)
        adapter = ChannelAdapter(clean.shape[1], server).to(clean.device)
        parameters = [adapter.weight]
        optimizer = torch.optim.Adam(parameters, lr=self.finetune_lr)
        for _ in range(self.finetune_epochs):
            order = torch.randperm(len(projected), generator=generator)
            for i in range(0, len(order), 64):
                batch = order[i:i + 64]
                loss = F.cross_entropy(adapter(projected[batch]), labels[batch])
                # only the adapter's gradient: the frozen server's parameters are never touched
                (adapter.weight.grad,) = torch.autograd.grad(loss, parameters)
                optimizer.step()
        with torch.no_grad():
            tuned = adapter(projected).argmax(dim=1).eq(labels).float().mean()
            untuned = server(projected).argmax(dim=1).eq(labels).float().mean()
        self.report.update(train_accuracy_untuned=round(float(untuned), 4), train_accuracy=round(float(tuned), 4))
        return adapter.eval()

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return features
        if self.matrix is None:
            raise RuntimeError("random_projection must be fitted first: call fit(client, server, x_train, y_train) "
                               "(the runner does this for you)")
        if features.shape[1] != len(self.matrix):
            raise ValueError(f"random_projection was fitted on {len(self.matrix)} channels, got features with "
                             f"{features.shape[1]}")
        return mix_channels(self.matrix.to(features.device), features)
