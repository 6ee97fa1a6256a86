"""Figures: the reconstruction grid (originals over each cell's reconstructions)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(ax: plt.Axes, image: torch.Tensor) -> None:
    img = image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_grid(originals: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]], path: str | Path,
                        max_images: int = 8) -> Path:
    """Save a PNG: the originals in the first row, then one labelled row per reconstruction."""
    n = min(max_images, len(originals))
    all_rows = [("original", originals)] + list(rows)
    fig, axes = plt.subplots(len(all_rows), n, figsize=(1.1 * n + 3.2, 1.1 * len(all_rows)), squeeze=False)
    for r, (label, images) in enumerate(all_rows):
        for i in range(n):
            _show(axes[r][i], images[i])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.3, wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
