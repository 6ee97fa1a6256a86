"""Per-image reconstruction metrics on [0, 1] images (torchmetrics), and their aggregation with a bootstrap CI."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.stats
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from splitnn.training import accuracy

#: Pixel metrics computed for every reconstructed image, and whether higher means more leakage.
PIXEL_METRICS: dict[str, bool] = {"mse": False, "psnr": True, "ssim": True}
#: Every per-image privacy metric a cell may store (pixel, evaluation classifier, LPIPS when its weights are
#: given), and whether higher means more leakage; tables and figures read directions from here.
IMAGE_METRICS: dict[str, bool] = {**PIXEL_METRICS, "attack_top1": True, "attack_top5": True,
                                  "knn_distance": False, "lpips": False}

__all__ = ["IMAGE_METRICS", "PIXEL_METRICS", "image_metrics", "summarize", "accuracy"]


@torch.no_grad()
def image_metrics(reconstruction: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    """MSE, PSNR (dB, data range 1) and SSIM of each reconstructed image against its original."""
    if reconstruction.shape != truth.shape:
        raise ValueError(f"reconstruction shape {tuple(reconstruction.shape)} != image shape {tuple(truth.shape)}")
    rec = reconstruction.detach().float().clamp(0, 1)
    ref = truth.detach().float()
    mse = [float(mean_squared_error(r, t)) for r, t in zip(rec, ref)]
    psnr = peak_signal_noise_ratio(rec, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(rec, ref, data_range=1.0, reduction="none")
    return {"mse": mse, "psnr": [float(v) for v in psnr], "ssim": [float(v) for v in ssim]}


def summarize(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and a bootstrap percentile confidence interval (NaN bounds when it cannot be computed)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if not np.isfinite(data).all():
        return mean, math.nan, math.nan
    if np.ptp(data) == 0:  # every resample has the same mean
        return mean, mean, mean
    result = scipy.stats.bootstrap((data,), np.mean, confidence_level=confidence, method="percentile",
                                   n_resamples=2000, rng=np.random.default_rng(seed))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)
