"""The learned inverse network (He, Zhang & Lee 2019, black-box setting): a decoder trained on auxiliary
images to map the defended features back to images. It queries the client (and its defense) as a black
box and never reads the client's weights."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Knowledge, Reconstruction, budget
from leakbench.attacks.cache import cached_module
from leakbench.attacks.registry import register
from leakbench.splitnn.params import Count, Positive, PositiveCount, Seed


class Decoder(nn.Module):
    """Standardised features -> conv -> transposed convs (x2 each, up to the image size) -> convs -> sigmoid."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], hidden: int):
        super().__init__()
        if len(feature_shape) != 3:
            raise ValueError(f"inverse_net needs spatial features (N, C, H, W) at the cut, got per-sample shape "
                             f"{tuple(feature_shape)}")
        c, h, _ = feature_shape
        channels, height, width = image_shape
        self.image_hw = (height, width)
        self.register_buffer("mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("std", torch.ones(1, c, 1, 1))
        layers: list[nn.Module] = [nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU()]
        size = h
        while size * 2 <= height:  # undo the client's downsampling
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
            size *= 2
        layers += [nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def standardise_with(self, features: torch.Tensor) -> None:
        """Fix the per-channel input standardisation from a batch of (defended) features."""
        dims = [0, 2, 3]
        self.mean.copy_(features.mean(dim=dims, keepdim=True))
        self.std.copy_(features.std(dim=dims, keepdim=True).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.body((features - self.mean) / self.std)
        if tuple(x.shape[-2:]) != self.image_hw:
            x = F.interpolate(x, size=self.image_hw, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


@register("inverse_net")
class InverseNet(Attack):
    """Trains a decoder on auxiliary images, queried through the client and its defense (fresh defense
    randomness every epoch), to minimise the MSE to the images; applies it to the observed features.

    Cached on disk per (model, cut, defense, seed, attack parameters) when the runner identifies them.
    """

    base_knowledge = frozenset({Knowledge.AUXILIARY_DATA, Knowledge.QUERY_ACCESS})

    def __init__(self, hidden: PositiveCount = 64, epochs: Count = 15, lr: Positive = 5e-3,
                 batch_size: PositiveCount = 32, seed: Seed = 0):
        self.hidden, self.epochs, self.lr, self.batch_size, self.seed = hidden, epochs, lr, batch_size, seed

    def train_decoder(self, decoder: Decoder, images: torch.Tensor,
                      query: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        """Adam on the MSE between decoder(query(images)) and images; returns the mean loss of each epoch."""
        generator = torch.Generator().manual_seed(self.seed)
        decoder.standardise_with(query(images))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=self.lr)
        losses = []
        decoder.train()
        for _ in range(self.epochs):
            features = query(images)  # a fresh draw of the defense's randomness each epoch
            order = torch.randperm(len(images), generator=generator)
            total = 0.0
            for i in range(0, len(images), self.batch_size):
                idx = order[i:i + self.batch_size]
                optimizer.zero_grad()
                loss = F.mse_loss(decoder(features[idx]), images[idx])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(images))
        return losses

    def fitted_decoder(self, features: torch.Tensor, context: AttackContext) -> tuple[Decoder, bool, list[float]]:
        """The decoder for ``features``' shape, trained on the context's auxiliary images through its query oracle
        (or loaded from the attack cache): ``(decoder in eval mode, from_cache, losses per epoch)``. Other attacks
        that start from this decoder (``peel_prior``) call this, so they share one cached decoder per cell."""
        shape = context.require("image_shape", by=self)
        (aux_images, _labels), query = context.require("auxiliary", "query", by=self)
        with torch.random.fork_rng(), torch.device("cpu"):  # initialised on the CPU: the same on every device
            torch.manual_seed(self.seed)
            decoder = Decoder(tuple(features.shape[1:]), shape, self.hidden)
        decoder = decoder.to(features.device)
        losses: list[float] = []
        key = None if context.cache_key is None else {
            "attack": self.name, **self.params, "context": context.cache_key, "features": list(features.shape[1:])}
        decoder, from_cache = cached_module(decoder, self.name, key, context.cache_dir,
                                            lambda d: losses.extend(self.train_decoder(d, aux_images, query)))
        return decoder.eval(), from_cache, losses

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        start = time.perf_counter()
        decoder, from_cache, losses = self.fitted_decoder(features, context)
        (aux_images, _labels) = context.require("auxiliary", by=self)
        with torch.no_grad():
            images = decoder(features.float()).to(features.dtype)
        seconds = time.perf_counter() - start
        # no fit through the client: its cost is training
        none = torch.zeros(len(features), dtype=torch.long, device=features.device)
        return Reconstruction(images, {"from_cache": from_cache, "train_losses": losses,
                                       "auxiliary_images": len(aux_images), "seconds": seconds,
                                       "budget": budget(seconds, none, none)})
