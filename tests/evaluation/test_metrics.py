import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import structural_similarity_index_measure

from leakbench.evaluation.metrics import CELL_METRICS, image_metrics, worst_case

SHAPES = [(3, 32, 32), (1, 32, 32), (3, 25, 25)]
NOISE = [0.02, 0.1, 0.3]


def _images(shape, noise, n=4, seed=0):
    """Smooth, digit-like originals (low-resolution noise upsampled) and noisy, clipped reconstructions of them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, shape[0], 6, 6, generator=g)
    truth = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False).clamp(0, 1)
    noisy = (truth + noise * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    return noisy, truth


def _skimage_ssim(rec, truth):
    return np.array([structural_similarity(r.numpy(), t.numpy(), data_range=1, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, channel_axis=0) for r, t in zip(rec, truth)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noise", NOISE)
def test_metrics_equal_skimage_per_image(shape, noise):
    rec, truth = _images(shape, noise)
    m = image_metrics(rec, truth)
    ssim_ref = _skimage_ssim(rec, truth)
    assert 0.05 < ssim_ref.min() and ssim_ref.max() < 0.999  # non-trivial: neither identical nor unrelated
    np.testing.assert_allclose(m["ssim"], ssim_ref, rtol=0, atol=1e-4)
    pairs = [(r.numpy(), t.numpy()) for r, t in zip(rec, truth)]
    np.testing.assert_allclose(m["mse"], [mean_squared_error(t, r) for r, t in pairs], rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], [peak_signal_noise_ratio(t, r, data_range=1) for r, t in pairs],
                               rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_reflect_padded_ssim_fails_the_reference_check(shape):
    """torchmetrics' default averages its map over a reflect-padded border: the check above catches that."""
    rec, truth = _images(shape, 0.1)
    padded = structural_similarity_index_measure(rec, truth, data_range=1.0, reduction="none").numpy()
    ssim_ref = _skimage_ssim(rec, truth)
    assert np.abs(padded - ssim_ref).max() > 1e-2
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(padded, ssim_ref, rtol=0, atol=1e-4)


def test_ssim_is_undefined_when_no_window_fits():
    rec, truth = _images((1, 10, 10), 0.1, n=2)
    m = image_metrics(rec, truth)
    assert all(math.isnan(v) for v in m["ssim"]) and all(v > 0 for v in m["mse"])


def test_identical_images_score_perfectly():
    x = torch.rand(3, 3, 32, 32)
    m = image_metrics(x, x)
    assert m["mse"] == [0.0] * 3
    assert all(math.isinf(v) for v in m["psnr"])
    assert all(abs(v - 1.0) < 1e-6 for v in m["ssim"])


def test_metrics_are_per_image_and_ordered():
    x = torch.rand(2, 3, 32, 32)
    noisy = x.clone()
    noisy[1] = (noisy[1] + 0.2 * torch.randn_like(noisy[1])).clamp(0, 1)
    m = image_metrics(noisy, x)
    assert m["mse"][0] == 0.0 and m["mse"][1] > 0
    assert abs(m["psnr"][1] - 10 * math.log10(1 / m["mse"][1])) < 1e-3


def test_reconstruction_is_clipped_to_the_data_range():
    x = torch.full((1, 1, 16, 16), 0.5)
    m = image_metrics(x + 1.0, x)  # everything above 1 is read as 1
    assert m["mse"][0] == pytest.approx(0.25)


def test_worst_case_reads_the_images_that_leak_most():
    psnr = [10.0 + i for i in range(20)]  # 10..29 dB
    top1 = [1.0] * 5 + [0.0] * 15
    out = worst_case({"psnr": psnr, "attack_top1": top1, "mse": [0.1] * 20})
    assert set(out) == set(CELL_METRICS) == {"psnr_p95", "recognised"}
    assert out["psnr_p95"] == pytest.approx(np.percentile(psnr, 95)) and out["psnr_p95"] > np.mean(psnr) + 8
    assert out["recognised"] == 0.25
    assert all(CELL_METRICS.values())  # both: higher means more leakage


def test_worst_case_without_classifier_and_with_perfect_images():
    assert worst_case({"psnr": [20.0, 30.0]}) == {"psnr_p95": pytest.approx(29.5)}
    assert worst_case({"psnr": [20.0] * 18 + [math.inf] * 2})["psnr_p95"] == math.inf  # numpy alone gives NaN
    assert worst_case({"psnr": [20.0] * 19 + [math.inf]})["psnr_p95"] == math.inf
    assert worst_case({"psnr": [20.0, 30.0, math.nan]})["psnr_p95"] == pytest.approx(29.5)
    assert math.isnan(worst_case({"attack_top1": []})["recognised"])
