import math

import torch

from evaluation.metrics import image_metrics, summarize


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


def test_summary_interval_contains_the_mean():
    mean, low, high = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert mean == 4.0 and low < mean < high
    assert summarize([2.0, 2.0]) == (2.0, 2.0, 2.0)
