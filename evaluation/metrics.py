"""Per-image reconstruction metrics on [0, 1] images, equal to their references, and per-cell worst cases.

SSIM is Wang et al. (2004) as skimage, piq and pytorch-msssim compute it: Gaussian 11x11 window, sigma 1.5,
K1 0.01, K2 0.03, population covariance, averaged over the *valid* region (windows that lie inside the image) and
then over channels. torchmetrics (since 1.6) averages its map over a reflect-padded border instead, which reads up
to 0.2 lower on noisy 32x32 images, so we take torchmetrics' full map and crop that border off.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from leakbench.evaluation.statistics import MIN_CI_SAMPLES, summarize
from leakbench.splitnn.training import accuracy

#: Pixel metrics computed for every reconstructed image, and whether higher means more leakage.
PIXEL_METRICS: dict[str, bool] = {"mse": False, "psnr": True, "ssim": True}
#: Every per-image privacy metric a cell may store (pixel, evaluation classifier, LPIPS when its weights are
#: given), and whether higher means more leakage; tables and figures read directions from here.
IMAGE_METRICS: dict[str, bool] = {**PIXEL_METRICS, "attack_top1": True, "attack_top5": True,
                                  "knn_distance": False, "lpips": False}
#: Per-cell worst-case metrics (``worst_case``) and whether higher means more leakage: the PSNR of the images
#: that leak most, and the share of images the evaluation classifier recognises.
CELL_METRICS: dict[str, bool] = {"psnr_p95": True, "recognised": True}

#: SSIM's window (Wang et al. 2004): Gaussian, sigma 1.5, truncated at 3.5 sigma, so radius 5 (11x11), the
#: window torchmetrics and skimage both build from sigma; the valid region drops ``SSIM_RADIUS`` pixels a side.
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
#: Percentile of per-image PSNR reported as a cell's worst case.
WORST_CASE_PERCENTILE = 95.0

__all__ = ["CELL_METRICS", "IMAGE_METRICS", "MIN_CI_SAMPLES", "PIXEL_METRICS", "SSIM_RADIUS", "SSIM_SIGMA",
           "accuracy", "image_metrics", "ssim", "summarize", "worst_case"]


@torch.no_grad()
def ssim(reconstruction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) images with data range 1, over the valid region (NaN below 11x11)."""
    rec, ref = reconstruction.detach().double(), truth.detach().double()
    r = SSIM_RADIUS
    if min(rec.shape[-2:]) <= 2 * r:  # no window fits inside the image: SSIM is undefined there
        return torch.full((rec.shape[0],), math.nan, dtype=torch.float64)
    _, full = structural_similarity_index_measure(rec, ref, gaussian_kernel=True, sigma=SSIM_SIGMA,
                                                  data_range=1.0, k1=0.01, k2=0.03, reduction="none",
                                                  return_full_image=True)
    # full is the (N, C, H, W) map over the reflect-padded input; keep the windows that lie inside the image.
    return full[..., r:-r, r:-r].mean(dim=(1, 2, 3))


@torch.no_grad()
def image_metrics(reconstruction: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    """MSE, PSNR (dB, data range 1) and SSIM (valid region) of each reconstructed image against its original."""
    if reconstruction.shape != truth.shape:
        raise ValueError(f"reconstruction shape {tuple(reconstruction.shape)} != image shape {tuple(truth.shape)}")
    rec = reconstruction.detach().double().clamp(0, 1)  # float64 like the references; the images are small
    ref = truth.detach().double()
    mse = [float(mean_squared_error(r, t)) for r, t in zip(rec, ref)]
    psnr = peak_signal_noise_ratio(rec, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return {"mse": mse, "psnr": [float(v) for v in psnr], "ssim": [float(v) for v in ssim(rec, ref)]}


def worst_case(per_image: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """A cell's worst case: ``psnr_p95``, the 95th percentile of per-image PSNR (the images that leak most), and
    ``recognised``, the share of images whose ``attack_top1`` is 1 (only when the classifier scored the cell).

    Means hide the few images an attack recovers well; these name them. NaN values are left out.
    """
    out: dict[str, float] = {}
    if "psnr" in per_image:
        out["psnr_p95"] = _percentile(per_image["psnr"], WORST_CASE_PERCENTILE)
    if "attack_top1" in per_image:
        top1 = np.asarray(per_image["attack_top1"], dtype=float)
        top1 = top1[~np.isnan(top1)]
        out["recognised"] = float((top1 == 1).mean()) if top1.size else math.nan
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    """numpy's linear percentile, except that it is +inf (not NaN) when it interpolates towards a perfect image."""
    data = np.sort(np.asarray(values, dtype=float))
    data = data[~np.isnan(data)]
    if data.size == 0:
        return math.nan
    position = q / 100 * (data.size - 1)
    upper = data[math.ceil(position)]
    if math.isinf(upper) and (position > math.floor(position) or math.isinf(data[math.floor(position)])):
        return float(upper)
    return float(np.percentile(data, q))
