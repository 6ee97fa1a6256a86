"""evaluation.dfil: the Fisher trace against exact Jacobians, the Cramer-Rao bound against Monte Carlo estimators in
the linear-Gaussian case (numpy references), and the bound the runner stores per cell."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from harness import randomise_batchnorm
from leakbench import defenses
from leakbench.evaluation import ExperimentConfig, Matrix, ResultStore, dfil


def conv_client() -> nn.Module:
    torch.manual_seed(0)
    client = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2))
    randomise_batchnorm(client)
    return client.eval()


def jacobians(client: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each image's Jacobian (features x pixels) from torch.autograd.functional.jacobian."""
    return [torch.autograd.functional.jacobian(lambda v: client(v[None])[0], xi).reshape(-1, xi.numel()) for xi in x]


def test_the_exact_trace_is_the_jacobians_frobenius_norm_and_relative_noise_adds_its_scale_term():
    """Absolute sigma: tr I = ||J||_F^2 / sigma^2. Relative sigma = s RMS(f): plus 2 m |grad sigma|^2 / sigma^2, with
    grad sigma = s J^T f / (sqrt(m) ||f||). Hutchinson agrees within 4 standard errors."""
    client, x, s = conv_client(), torch.rand(3, 2, 6, 6), 0.3
    absolute = dfil.bound(client, defenses.get("gaussian_noise", scale=s, relative=False), x)
    relative = dfil.bound(client, defenses.get("gaussian_noise", scale=s), x)
    assert absolute.method == relative.method == "exact"
    for i, J in enumerate(jacobians(client, x)):
        f = client(x[i:i + 1]).detach().flatten()
        assert J.abs().sum() > 0 and not torch.allclose(J @ J.T, torch.eye(len(f)))  # non-trivial
        assert float(absolute.trace[i]) == pytest.approx(float(J.pow(2).sum()) / s ** 2, rel=1e-5)
        sigma, m = s * f.pow(2).mean().sqrt(), f.numel()
        grad_sigma = s * (J.T @ f) / (math.sqrt(m) * f.norm())
        expected = (J.pow(2).sum() + 2 * m * grad_sigma.pow(2).sum()) / sigma ** 2
        assert float(relative.trace[i]) == pytest.approx(float(expected), rel=1e-5)
    trace, se = dfil.fisher_trace(client, defenses.get("gaussian_noise", scale=s).noise_law(), x, probes=64)
    assert ((trace - relative.trace).abs() < 4 * se).all() and (se > 0).all()
    assert torch.allclose(relative.mse_bound, 72 / relative.trace.double())  # d = 2 x 6 x 6
    assert torch.allclose(relative.psnr_bound, -10 * torch.log10(relative.mse_bound))


class Linear(nn.Module):
    """f(x) = A x on flattened images."""

    def __init__(self, a: np.ndarray):
        super().__init__()
        self.a = torch.from_numpy(a).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.a.T


def monte_carlo_mse(a: np.ndarray, x: np.ndarray, sigma: float, estimator, draws: int = 4000) -> float:
    rng = np.random.default_rng(0)
    z = a @ x + sigma * rng.standard_normal((draws, a.shape[0]))
    return float(((estimator(z) - x) ** 2).mean())


def test_least_squares_respects_the_bound_it_meets_for_orthogonal_a_and_ridge_can_beat_it():
    """f(x) = A x + N(0, sigma^2): least squares (unbiased) has MSE sigma^2 tr((A^T A)^-1) / d >= the bound
    d sigma^2 / ||A||_F^2 (numpy), with equality when A^T A = c^2 I; ridge shrinkage towards a good guess (biased)
    goes below it, so the bound holds for unbiased attackers only."""
    rng = np.random.default_rng(1)
    d, m, sigma = 16, 24, 0.5
    x = 0.5 + 0.05 * rng.standard_normal(d)
    images = torch.from_numpy(x).float().view(1, 1, 4, 4)
    noise = defenses.get("gaussian_noise", scale=sigma, relative=False)
    generic = rng.standard_normal((m, d))
    orthogonal = 2.0 * np.linalg.qr(rng.standard_normal((m, d)))[0]  # A^T A = 4 I
    for a in (generic, orthogonal):
        result = dfil.bound(Linear(a), noise, images)
        reference = d * sigma ** 2 / np.sum(a ** 2)  # numpy: 1 / dFIL
        assert float(result.mse_bound[0]) == pytest.approx(reference, rel=1e-5)
        pinv = np.linalg.pinv(a)
        least_squares = monte_carlo_mse(a, x, sigma, lambda z: z @ pinv.T)
        expected = sigma ** 2 * np.trace(np.linalg.inv(a.T @ a)) / d
        assert least_squares == pytest.approx(expected, rel=0.05)  # 4,000 draws x 16 pixels
        assert least_squares >= 0.95 * reference
    assert expected == pytest.approx(reference, rel=1e-9)  # tight for the orthogonal A
    generic_ls = sigma ** 2 * np.trace(np.linalg.inv(generic.T @ generic)) / d
    assert generic_ls > 1.2 * d * sigma ** 2 / np.sum(generic ** 2)  # strict for a generic A
    lam, prior = 50.0, np.full(d, 0.5)
    ridge = np.linalg.solve(generic.T @ generic + lam * np.eye(d), generic.T)
    shrunk = monte_carlo_mse(generic, x, sigma, lambda z: prior + (z - generic @ prior) @ ridge.T)
    assert shrunk < 0.5 * d * sigma ** 2 / np.sum(generic ** 2)


def test_defenses_without_noise_are_unbounded_and_a_random_one_without_a_law_is_unknown():
    client, x = conv_client(), torch.rand(2, 2, 6, 6)
    for name, params in (("none", {}), ("quantization", {"bits": 2}), ("topk", {"keep": 0.2}),
                         ("dropout", {"p": 0.5}), ("gaussian_noise", {"scale": 0.0})):
        result = dfil.bound(client, defenses.get(name, **params), x)
        assert result.method == "unbounded" and result.reason, name
        assert result.per_image() == {"dfil": [math.inf] * 2, "dfil_mse_bound": [0.0] * 2,
                                      "dfil_psnr_bound": [math.inf] * 2}

    class Jitter(defenses.FeatureDefense):
        def transform(self, features):
            return features + torch.rand(features.shape, generator=self.generator(features.device))

    unknown = dfil.bound(client, Jitter(), x)
    assert unknown.method == "unknown" and "noise_law" in unknown.reason and math.isnan(unknown.per_image()["dfil"][0])


def test_laplace_and_feature_dp_laws():
    """Laplace at equal variance carries twice Gaussian's location information (1/b^2, b = sigma / sqrt 2); feature
    DP's noise is fixed, on clipped features (clip larger than every feature norm: the Jacobian is the client's)."""
    client, x = conv_client(), torch.rand(2, 2, 6, 6)
    gauss = dfil.bound(client, defenses.get("gaussian_noise", scale=0.2, relative=False), x)
    laplace = dfil.bound(client, defenses.get("laplace_noise", scale=0.2, relative=False), x)
    assert torch.allclose(laplace.trace, 2 * gauss.trace)
    dp = defenses.get("feature_dp", epsilon=5.0, clip=1e6)
    std = dp.noise_scale
    assert torch.allclose(dfil.bound(client, dp, x).trace, gauss.trace * 0.2 ** 2 / std ** 2, rtol=1e-4)


CELLS = {"name": "dfil", "seed": 0, "dataset": {"name": "digits", "params": {"size": 16}}, "model": "resnet20",
         "train": {"epochs": 1, "batch_size": 128}, "cut": "layer1",
         "defenses": ["none", {"name": "gaussian_noise", "params": {"scale": 0.1}},
                      {"name": "gaussian_noise", "params": {"scale": 0.5}}],
         "attacks": [{"name": "rmle", "params": {"iterations": 2}}],
         "evaluation": {"num_images": 2, "classifier": False}}


def test_cells_store_the_bound_unbounded_without_noise_and_lower_with_more_noise(tmp_path):
    matrix = Matrix(ExperimentConfig(CELLS), progress=False)
    with ResultStore(tmp_path / "r.sqlite") as store:
        matrix.run(store)
        cells = store.cells()
        images = store.images()
    assert set(cells.status) == {"done"}
    scale = [json.loads(p).get("scale", 0.0) for p in cells.defense_params]
    none, small, large = (cells.iloc[scale.index(s)] for s in (0.0, 0.1, 0.5))
    assert none.dfil_method == "unbounded" and math.isinf(none.dfil) and none.dfil_mse_bound == 0
    assert small.dfil_method.startswith("hutchinson") and 0 < small.dfil_mse_bound < large.dfil_mse_bound
    assert small.dfil_psnr_bound > large.dfil_psnr_bound
    assert {"dfil", "dfil_mse_bound", "dfil_psnr_bound"} <= set(images.columns) and len(images) == 6
