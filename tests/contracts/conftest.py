"""The one cut the contract suite runs every registered attack and defense on: the smallest model at the smallest
size (ResNet-20, untrained, on 16x16 digits, split after layer1), and three test images through it."""
from typing import NamedTuple

import pytest
import torch
from torch import nn

import harness
from leakbench.splitnn import split, zoo
from leakbench.splitnn.datasets import Dataset


class TinyCut(NamedTuple):
    data: Dataset
    client: nn.Module
    server: nn.Module
    images: torch.Tensor
    features: torch.Tensor


@pytest.fixture(scope="session")
def tiny_cut() -> TinyCut:
    data = harness.digits16()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = zoo.get("resnet20").eval()
    client, server = split(model, "layer1")
    images = data.x_test[:3]
    with torch.no_grad():
        features = client(images)
    return TinyCut(data, client.eval(), server.eval(), images, features)
