"""The batched box-constrained L-BFGS (attacks.box_lbfgs) every fit goes through, with SciPy as its reference."""
import re
import time

import numpy as np
import pytest
import scipy.optimize
import torch

from harness import ROOT
from leakbench.attacks.box_lbfgs import minimize_box
from leakbench.attacks.optim import fit_input


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
    result = minimize_box(_quadratic(a, b), torch.zeros_like(b), lower=-0.5, upper=0.7, max_iter=2000)
    x, iterations = result.x, result.iterations
    assert ((x >= -0.5) & (x <= 0.7)).all()  # every iterate stays inside the box
    assert ((x == -0.5) | (x == 0.7)).any()  # and the bounds are active at the solution
    for i in range(len(b)):
        ref = _scipy_reference(a[i].numpy(), b[i].numpy(), -0.5, 0.7)
        assert np.abs(x[i].numpy() - ref).max() < 1e-6
    assert (iterations > 0).all() and (result.evaluations > iterations).all()  # the start costs one as well


def test_unconstrained_solution_is_exact():
    a, b = _problem(batch=3, n=8, seed=1)
    x = minimize_box(_quadratic(a, b), torch.zeros_like(b), max_iter=500).x
    exact = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    assert (x - exact).abs().max() < 1e-8


def test_each_sample_is_solved_as_if_it_were_alone():
    a, b = _problem(batch=5, n=10, seed=2)
    together = minimize_box(_quadratic(a, b), torch.zeros_like(b), lower=0.0, max_iter=40, max_evals=30)
    for i in range(len(b)):
        alone = minimize_box(_quadratic(a[i:i + 1], b[i:i + 1]), torch.zeros_like(b[i:i + 1]), lower=0.0,
                             max_iter=40, max_evals=30)
        assert torch.allclose(together.x[i], alone.x[0], atol=1e-8, rtol=1e-6)
        assert together.evaluations[i] == alone.evaluations[0]  # its budget is its own too
        assert together.iterations[i] == alone.iterations[0]


def test_a_loss_without_one_value_per_sample_is_refused():
    with pytest.raises(ValueError, match="one value per sample"):
        minimize_box(lambda x: x.pow(2).sum(), torch.ones(3, 4))


def test_evaluations_are_counted_per_sample_and_capped():
    a, b = _problem(batch=3, n=10, seed=3)
    calls = []

    def counted(x):
        calls.append(len(x))
        return _quadratic(a[:1], b[:1])(x)

    alone = minimize_box(counted, torch.zeros_like(b[:1]), max_iter=200)
    assert len(calls) == int(alone.evaluations[0])  # alone, every loss-and-gradient call is one evaluation
    free = minimize_box(_quadratic(a, b), torch.zeros_like(b), max_iter=200)
    assert free.evaluations[0] == alone.evaluations[0]
    capped = minimize_box(_quadratic(a, b), torch.zeros_like(b), max_iter=200, max_evals=7)
    assert (capped.evaluations <= 7).all() and (capped.evaluations == 7).any()
    loss = _quadratic(a, b)
    assert (loss(capped.x) > loss(free.x)).all()  # the cap stopped it before convergence
    assert (loss(capped.x) < loss(torch.zeros_like(b))).all()  # but after real progress
    none = minimize_box(loss, torch.zeros_like(b), max_evals=0)
    assert (none.evaluations == 0).all() and torch.equal(none.x, torch.zeros_like(b))


def test_a_deadline_stops_the_solve(monkeypatch):
    a, b = _problem(batch=2, n=10, seed=4)
    loss = _quadratic(a, b)
    clock = iter(range(10 ** 9))  # a clock that advances one second per reading
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    result = minimize_box(loss, torch.zeros_like(b), max_iter=10_000, gtol=0, ftol=0, deadline=5.0)
    assert result.timed_out and 1 <= int(result.evaluations.max()) <= 5
    assert not minimize_box(loss, torch.zeros_like(b), max_iter=3, deadline=10.0 ** 9).timed_out


def test_fit_input_fits_a_linear_layer_within_bounds():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 10).double()
    x_true = torch.rand(4, 6, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x_true)
    fit = fit_input(layer, y, torch.full_like(x_true, 0.5), lower=0.0, upper=1.0, max_iter=200)
    assert fit.residual < 1e-9 and (fit.x - x_true).abs().max() < 1e-7
    assert fit.iterations.shape == (4,) and fit.evaluations.shape == (4,)


def test_no_scipy_optimiser_under_attacks():
    root = ROOT / "attacks"
    imports = re.compile(r"^\s*(import|from)\s+scipy\b", re.MULTILINE)
    assert [str(p) for p in root.rglob("*.py") if imports.search(p.read_text())] == []
