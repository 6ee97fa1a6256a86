"""The batched box-constrained L-BFGS (attacks.box_lbfgs) and fit_input's torch method."""
import numpy as np
import pytest
import scipy.optimize
import torch

from attacks.box_lbfgs import minimize_box
from attacks.optim import fit_input


def _quadratic(a: torch.Tensor, b: torch.Tensor):
    """Per-sample 0.5·||A_i x_i - b_i||² with a different ill-conditioned A_i per sample."""
    def loss(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.einsum("bij,bj->bi", a, x) - b).pow(2).sum(1)
    return loss


def _problem(batch: int = 4, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, 1.5, n, dtype=torch.float64))
    b = torch.randn(batch, n, generator=g, dtype=torch.float64) * 3
    return a, b


def _scipy_reference(a: np.ndarray, b: np.ndarray, lower: float, upper: float) -> np.ndarray:
    def f(x):
        r = a @ x - b
        return 0.5 * r @ r, a.T @ r
    res = scipy.optimize.minimize(f, np.zeros(len(b)), jac=True, method="L-BFGS-B", bounds=[(lower, upper)] * len(b),
                                  options={"maxiter": 5000, "ftol": 1e-20, "gtol": 1e-14})
    return res.x


def test_box_constrained_least_squares_matches_scipy_per_sample():
    a, b = _problem()
    x, iterations = minimize_box(_quadratic(a, b), torch.zeros_like(b), lower=-0.5, upper=0.7, max_iter=2000)
    assert ((x >= -0.5) & (x <= 0.7)).all()  # every iterate stays inside the box
    assert ((x == -0.5) | (x == 0.7)).any()  # and the bounds are active at the solution
    for i in range(len(b)):
        ref = _scipy_reference(a[i].numpy(), b[i].numpy(), -0.5, 0.7)
        assert np.abs(x[i].numpy() - ref).max() < 1e-6
    assert (iterations > 0).all()


def test_unconstrained_solution_is_exact():
    a, b = _problem(batch=3, n=8, seed=1)
    x, _ = minimize_box(_quadratic(a, b), torch.zeros_like(b), max_iter=500)
    exact = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    assert (x - exact).abs().max() < 1e-8


def test_each_sample_is_solved_as_if_it_were_alone():
    a, b = _problem(batch=5, n=10, seed=2)
    together, _ = minimize_box(_quadratic(a, b), torch.zeros_like(b), lower=0.0, max_iter=40)
    for i in range(len(b)):
        alone, _ = minimize_box(_quadratic(a[i:i + 1], b[i:i + 1]), torch.zeros_like(b[i:i + 1]), lower=0.0,
                                max_iter=40)
        assert torch.allclose(together[i], alone[0], atol=1e-12, rtol=0)


def test_a_loss_without_one_value_per_sample_is_refused():
    with pytest.raises(ValueError, match="one value per sample"):
        minimize_box(lambda x: x.pow(2).sum(), torch.ones(3, 4))


def test_fit_input_torch_method_fits_a_relu_layer_within_bounds():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 10).double()
    x_true = torch.rand(4, 6, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x_true)
    fit = fit_input(layer, y, torch.full_like(x_true, 0.5), lower=0.0, upper=1.0, max_iter=200, method="torch")
    assert fit.residual < 1e-9 and (fit.x - x_true).abs().max() < 1e-7
    with pytest.raises(ValueError, match="method"):
        fit_input(layer, y, x_true, method="adam")
