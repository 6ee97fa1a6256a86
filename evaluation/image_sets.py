"""Which test images a cell attacks, and which ones tuning may use: two disjoint slices of the test split.

The tail of the test split is the validation slice on which attack defaults are tuned
(``benchmarks/tune_attacks.py``); no experiment reports it. A cell attacks ``num_images`` images drawn
from the rest with its seed, so seeds differ in their images as well as in their model, while every
attack and defense of one seed sees the same images (what a paired comparison needs).
"""
from __future__ import annotations

import torch

from leakbench.splitnn.datasets import Dataset

#: Size of the validation slice at the end of the test split (at most a quarter of the split).
TUNING_IMAGES = 32


def tuning_size(data: Dataset) -> int:
    """How many test images (at the end of the split) are reserved for tuning."""
    return min(TUNING_IMAGES, len(data.x_test) // 4)


def tuning_indices(data: Dataset) -> torch.Tensor:
    """Indices of the validation slice: the last ``tuning_size`` test images."""
    n = len(data.x_test)
    return torch.arange(n - tuning_size(data), n)


def reportable(data: Dataset) -> int:
    """How many test images an experiment may attack (the split minus the validation slice)."""
    return len(data.x_test) - tuning_size(data)


def attacked_indices(data: Dataset, seed: int, num_images: int) -> torch.Tensor:
    """The ``num_images`` test images a cell of seed ``seed`` attacks: a seeded draw without replacement
    from the images outside the validation slice."""
    available = reportable(data)
    if num_images > available:
        raise ValueError(f"evaluation.num_images is {num_images}, but the test split has only {available} images "
                         f"outside the {tuning_size(data)} reserved for tuning")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(available, generator=generator)[:num_images].sort().values
