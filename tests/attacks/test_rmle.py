import time

import pytest
import torch

from leakbench import attacks
from leakbench.attacks.base import BUDGET_KEYS, AttackContext
from leakbench.attacks.priors import total_variation
from leakbench.splitnn import split, zoo
from leakbench.splitnn.errors import ParameterError


def test_rmle_recovers_the_image_through_the_stem():
    model = zoo.get("resnet20").eval()
    client, _ = split(model, "relu")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        features = client(x)
    rec = attacks.get("rmle", iterations=300, tv_weight=0.0).reconstruct(
        client, features, AttackContext(image_shape=(3, 16, 16)))
    assert float(((rec.images - x) ** 2).mean()) < 1e-4
    assert rec.diagnostics["iterations"] > 0
    spent = rec.diagnostics["budget"]
    assert set(spent) == set(BUDGET_KEYS) and spent["blockwise_evaluations"] == 0
    assert len(spent["end_to_end_evaluations_per_sample"]) == 2
    assert spent["end_to_end_evaluations"] >= spent["end_to_end_iterations"] > 0


def test_tv_prior_smooths_the_reconstruction():
    model = zoo.get("resnet20").eval()
    client, _ = split(model, "layer1")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        features = client(x) + 0.5 * torch.randn_like(client(x))
    plain = attacks.get("rmle", iterations=50, tv_weight=0.0).reconstruct(
        client, features, AttackContext(image_shape=(3, 16, 16)))
    smooth = attacks.get("rmle", iterations=50, tv_weight=1.0).reconstruct(
        client, features, AttackContext(image_shape=(3, 16, 16)))
    assert float(total_variation(smooth.images).sum()) < float(total_variation(plain.images).sum())


def test_total_variation_is_per_sample():
    x = torch.rand(3, 2, 5, 5)
    tv = total_variation(x)
    assert tv.shape == (3,)
    assert torch.allclose(tv[1], total_variation(x[1:2])[0])
    assert float(total_variation(torch.full((1, 1, 4, 4), 0.3))) == 0.0


@pytest.fixture(scope="module")
def post_relu_cut():
    torch.manual_seed(0)
    model = zoo.get("resnet20").eval().double()
    client, _ = split(model, "layer1.0")  # ends in the block's ReLU: relu_consistency differs from plain
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        return client, client(x)


def test_the_ablation_knobs_change_the_fit_and_are_recorded(post_relu_cut):
    client, features = post_relu_cut
    plain = attacks.get("rmle", iterations=40).reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    relu = attacks.get("rmle", iterations=40, loss="relu_consistency").reconstruct(
        client, features, AttackContext(image_shape=(3, 8, 8)))
    assert not torch.allclose(plain.images, relu.images)
    assert relu.diagnostics["loss"] == "relu_consistency"
    several = attacks.get("rmle", iterations=40, starts=["grey", "uniform", "zeros"], max_evaluations=60)
    rec = several.reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert set(rec.diagnostics["start_residuals"]) == {"grey", "uniform", "zeros"}
    assert all(s in {"grey", "uniform", "zeros"} for s in rec.diagnostics["start"])
    # 20 per start; grey and uniform use theirs, zeros may stop at once (a corner of the box can be stationary)
    assert all(40 < e <= 60 for e in rec.diagnostics["budget"]["end_to_end_evaluations_per_sample"])
    # Per sample the fit whose features match best is kept (PEEL's rule), so it is no worse than any start.
    assert rec.diagnostics["residual"] <= min(rec.diagnostics["start_residuals"].values()) * (1 + 1e-9)
    again = several.reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert torch.equal(again.images, rec.images)  # the random start is seeded
    assert attacks.get("rmle", starts=3).params["starts"] == ["grey", "uniform", "uniform"]


def test_max_seconds_bounds_the_wall_time(post_relu_cut, monkeypatch):
    client, features = post_relu_cut
    clock = iter(range(10 ** 9))  # a clock that advances 10 ms per reading, whatever the machine's speed
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 0.01)
    rec = attacks.get("rmle", iterations=100_000, max_seconds=0.5, starts=2).reconstruct(
        client, features, AttackContext(image_shape=(3, 8, 8)))
    assert rec.diagnostics["timed_out"] and rec.diagnostics["budget"]["seconds"] <= 0.6
    assert rec.diagnostics["budget"]["end_to_end_evaluations"] < 50  # the clock is read at least once a try


@pytest.mark.parametrize("params, key", [({"loss": "huber"}, "loss"), ({"starts": ["grey", "noise"]}, "starts"),
                                         ({"starts": 0}, "starts"), ({"starts": []}, "starts"),
                                         ({"max_evaluations": 0}, "max_evaluations"),
                                         ({"starts": 3, "max_evaluations": 2}, "max_evaluations"),
                                         ({"max_evaluations": 10 ** 9}, "max_evaluations"),
                                         ({"max_seconds": 0}, "max_seconds"), ({"max_seconds": 1e9}, "max_seconds"),
                                         ({"iterations": 10 ** 9}, "iterations")])
def test_bad_parameters_are_refused(params, key):
    with pytest.raises(ParameterError, match=key):
        attacks.get("rmle", **params)
