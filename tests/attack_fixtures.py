"""Shared, cached fixtures for the attack tests: ResNet-20 on 16x16 digits, split after layer1."""
from __future__ import annotations

import torch
from torch import nn

from leakbench.splitnn import TrainConfig, datasets, split, train

SIZE = 16


def digits16():
    return datasets.get("digits", size=SIZE)


def trained_split(data, epochs: int = 4):
    """(trained model, client, server); the checkpoint cache makes every call after the first free."""
    config = TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=epochs, batch_size=64)
    trained = train(config, data=data, progress=False)
    client, server = split(trained.model, "layer1")
    return trained, client.eval(), server.eval()


def psnr(images: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean PSNR (dB) of [0, 1] images, per image then averaged."""
    mse = (images - truth).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def randomise_batchnorm(module: nn.Module) -> None:
    """Give BatchNorm layers non-trivial eval statistics, as a trained network has."""
    g = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.data.uniform_(0.5, 1.5, generator=g)
            bn.bias.data.uniform_(-0.2, 0.2, generator=g)
