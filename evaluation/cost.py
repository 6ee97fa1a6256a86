"""What a grid will cost before it starts: its cell count and each cell's peak memory, estimated from the
model, the cut and the image counts on the meta device (no memory, no data loaded).

The estimate adds the dataset's tensors, the model's weights with their gradients and optimiser state, and the
larger of the two activation footprints a cell has: training (every layer's output at ``batch_size``, float32,
kept for the backward pass with its gradient) and attacking (the client's outputs at ``num_images``, float64,
likewise). It is an order of magnitude, not a promise; its purpose is to refuse a grid that cannot fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

#: A grid larger than this is refused unless forced (a typo in a list is the usual cause).
MAX_CELLS = 10_000
#: Python, torch, the libraries and the evaluation classifier: the process running the 36 cells of
#: peel_vs_rmle_small peaked at 1,486 MB resident over its lifetime, which this estimate puts at 1.33 GiB.
BASELINE_BYTES = 2 ** 30


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _outputs(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """(module name, elements per sample of its output) for every leaf module, in forward order."""
    found: list[tuple[str, int]] = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: found.append((name, o[0].numel())))
             for name, module in model.named_modules() if not list(module.children())]
    try:
        with torch.no_grad():
            model(torch.empty((2, *shape), device="meta"))  # two: BatchNorm refuses one value per channel
    finally:
        for hook in hooks:
            hook.remove()
    return found


def cell_bytes(model: nn.Module, cut: str, image_shape: tuple[int, int, int], dataset_images: int,
               num_images: int, batch_size: int) -> int:
    """Estimated peak memory of one cell (``model`` on the meta device); ``num_images``: the images an attack
    works on at once (``evaluation.batch_size`` when the attack runs in chunks)."""
    outputs = _outputs(model, image_shape)
    names = [name for name, _ in outputs]
    last = max((i for i, name in enumerate(names) if name == cut or name.startswith(cut + ".")), default=len(names) - 1)
    client = sum(n for _, n in outputs[:last + 1])
    everything = sum(n for _, n in outputs)
    weights = sum(p.numel() for p in model.parameters()) * 4
    pixels = image_shape[0] * image_shape[1] * image_shape[2]
    train = everything * batch_size * 4 * 2
    attack = (client + pixels) * num_images * 8 * 2
    return BASELINE_BYTES + dataset_images * pixels * 4 * 2 + weights * 4 + max(train, attack)


@dataclass(frozen=True)
class Cost:
    cells: int
    #: The largest estimated peak memory of any cell, and the cell label it belongs to.
    peak_bytes: int
    peak_cell: str

    def describe(self) -> str:
        return (f"{self.cells} cells; estimated peak memory per cell up to {self.peak_bytes / 2 ** 30:.2f} GiB "
                f"({self.peak_cell}); this machine has {machine_memory() / 2 ** 30:.0f} GiB")

    def problems(self, memory: int | None = None) -> list[str]:
        """Why this grid should not start here (empty when it may)."""
        memory = machine_memory() if memory is None else memory
        found = []
        if self.cells > MAX_CELLS:
            found.append(f"{self.cells} cells is over the bound of {MAX_CELLS:,}")
        if self.peak_bytes > 0.8 * memory:
            found.append(f"a cell may need {self.peak_bytes / 2 ** 30:.1f} GiB, over 80% of this machine's "
                         f"{memory / 2 ** 30:.0f} GiB ({self.peak_cell})")
        return found
