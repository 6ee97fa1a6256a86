"""Transform defenses (noise, feature-level DP, quantization, top-k, dropout, pruning): behaviour tests. That each
one's declared strength zero is the identity is the contract suite's (tests/contracts/test_defense_contracts.py)."""
import math

import pytest
import torch
from torch import nn

from leakbench import defenses
from leakbench.defenses.noise import analytic_gaussian_sigma, classic_gaussian_sigma, gaussian_delta
from leakbench.splitnn import ParameterError

#: The parameters at which each transform defense does nothing (its strength 0), as each class declares them.
STRENGTH_ZERO = {n: defenses.defense_class(n).strength_zero for n in defenses.names()
                 if defenses.defense_class(n).kind == "transform"}

#: Each transform defense from weak to strong.
LADDERS = {
    "gaussian_noise": [{"scale": s} for s in (0.0, 0.1, 0.3, 1.0, 3.0)],
    "laplace_noise": [{"scale": s} for s in (0.0, 0.1, 0.3, 1.0, 3.0)],
    # clips large enough that no sample is clipped: only the noise grows along the ladder
    "feature_dp": [{"epsilon": e, "clip": 200.0} for e in (math.inf, 1000.0, 100.0, 10.0, 1.0)],
    "feature_dp_laplace": [{"epsilon": e, "clip": 2000.0, "mechanism": "laplace"} for e in (math.inf, 1e5, 1e4, 1e3)],
    "quantization": [{"bits": b} for b in (None, 8, 4, 2, 1)],
    "topk": [{"keep": k} for k in (1.0, 0.5, 0.2, 0.05)],
    "dropout": [{"p": p} for p in (0.0, 0.1, 0.3, 0.6, 0.9)],
}


def features(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(1)).relu() * 3


def test_every_transform_defense_declares_a_strength_zero_of_its_own_parameters():
    assert {"none", "gaussian_noise", "feature_dp", "pruning"} <= set(STRENGTH_ZERO)
    for name, zero in STRENGTH_ZERO.items():
        assert zero is not None, name
        assert set(zero) <= set(defenses.defense_class(name).declared()), name
        defenses.get(name, **zero)  # valid parameters


@pytest.mark.parametrize("ladder", sorted(LADDERS))
def test_stronger_defense_never_brings_features_closer_to_the_clean_ones(ladder):
    f = features(64)
    name = "feature_dp" if ladder.startswith("feature_dp") else ladder
    distances = [float((defenses.get(name, seed=3, **p)(f) - f).flatten(1).norm(dim=1).mean())
                 for p in LADDERS[ladder]]
    assert distances[0] == 0.0
    assert all(a <= b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > distances[1]


@pytest.mark.parametrize("name, params", [("gaussian_noise", {"scale": 0.5}), ("laplace_noise", {"scale": 0.5}),
                                          ("feature_dp", {"epsilon": 2.0, "clip": 10.0}),
                                          ("feature_dp", {"epsilon": 2.0, "clip": 10.0, "mechanism": "laplace"}),
                                          ("dropout", {"p": 0.3})])
def test_random_defenses_are_seeded(name, params):
    f = features()
    a = defenses.get(name, seed=7, **params)(f)
    b = defenses.get(name, seed=7, **params)(f)
    c = defenses.get(name, seed=8, **params)(f)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name, params, key", [
    ("feature_dp", {"epsilon": 0.0}, "epsilon"), ("feature_dp", {"epsilon": -1.0}, "epsilon"),
    ("feature_dp", {"delta": 0.0}, "delta"), ("feature_dp", {"delta": 1.0}, "delta"),
    ("feature_dp", {"clip": 0.0}, "clip"), ("feature_dp", {"clip": math.inf}, "clip"),
    ("feature_dp", {"mechanism": "laplace", "delta": 1e-5}, "delta"),
    ("feature_dp", {"epsilon": 2.0, "calibration": "classic"}, "epsilon"),
    ("feature_dp", {"mechanism": "exponential"}, "mechanism"),
    ("laplace_noise", {"scale": -0.1}, "scale"),
    ("quantization", {"bits": 0}, "bits"), ("quantization", {"bits": 2.5}, "bits"),
    ("quantization", {"range": "fixed", "low": 1.0, "high": 1.0}, "high"),
    ("topk", {"keep": 0.0}, "keep"), ("topk", {"keep": 1.5}, "keep"),
    ("dropout", {"p": 1.0}, "p"), ("dropout", {"p": -0.1}, "p"),
    ("pruning", {"ratio": 1.0}, "ratio"), ("pruning", {"ratio": -0.1}, "ratio"),
    ("pruning", {"score": "shapley"}, "score"), ("pruning", {"finetune_server": -1}, "finetune_server"),
])
def test_bad_parameters_are_rejected_with_the_key(name, params, key):
    with pytest.raises(ParameterError) as info:
        defenses.get(name, **params)
    assert info.value.key == key


# ---------------------------------------------------------------- noise and feature-level DP

def test_laplace_noise_matches_gaussian_noise_power_and_is_laplacian():
    f = torch.zeros(4, 64, 32, 32)
    noise = defenses.get("laplace_noise", scale=0.2, relative=False)(f)
    assert abs(float(noise.std()) - 0.2) < 0.005
    b = 0.2 / math.sqrt(2)
    assert abs(float(noise.abs().mean()) - b) < 0.005  # E|Laplace(b)| = b


def test_feature_dp_clips_each_sample_to_the_bound():
    f = features()
    f[:4] *= 1e-3  # some samples already inside the ball stay unchanged
    for mechanism, norm in (("gaussian", lambda t: t.flatten(1).norm(dim=1)),
                            ("laplace", lambda t: t.flatten(1).abs().sum(dim=1))):
        dp = defenses.get("feature_dp", epsilon=math.inf, clip=5.0, mechanism=mechanism)
        clipped = dp(f)
        assert float(norm(clipped).max()) <= 5.0 * (1 + 1e-5)
        assert torch.equal(clipped[:4], f[:4])


def test_feature_dp_gaussian_noise_is_calibrated_to_epsilon_delta():
    dp = defenses.get("feature_dp", epsilon=0.5, delta=1e-5, clip=1.0)
    sigma = dp.noise_scale
    # the analytic calibration is exact (delta(sigma) = delta) and tighter than the classic bound
    assert gaussian_delta(sigma, 2.0, 0.5) <= 1e-5 and gaussian_delta(sigma * 0.999, 2.0, 0.5) > 1e-5
    assert sigma < classic_gaussian_sigma(2.0, 0.5, 1e-5)
    classic = defenses.get("feature_dp", epsilon=0.5, delta=1e-5, clip=1.0, calibration="classic")
    assert classic.noise_scale == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.5)
    # the added noise has that standard deviation
    f = torch.zeros(16, 64, 16, 16)
    assert float(dp(f).std()) == pytest.approx(sigma, rel=0.02)
    g = dp.guarantee()
    assert g["epsilon"] == 0.5 and g["delta"] == 1e-5 and g["unit"] == "per released feature vector"
    assert "gaussian" in g["mechanism"]


def test_analytic_gaussian_sigma_matches_a_known_value():
    # Balle & Wang (2018): sensitivity 1, epsilon 1, delta 1e-5 needs sigma ~= 3.73
    assert analytic_gaussian_sigma(1.0, 1.0, 1e-5) == pytest.approx(3.73, abs=0.01)


def test_feature_dp_laplace_uses_b_equal_to_sensitivity_over_epsilon():
    dp = defenses.get("feature_dp", epsilon=2.0, clip=3.0, mechanism="laplace")
    assert dp.noise_scale == pytest.approx(2 * 3.0 / 2.0)
    assert dp.guarantee()["delta"] == 0.0 and dp.guarantee()["mechanism"] == "laplace"


# ---------------------------------------------------------------- quantization, top-k, dropout

def test_quantization_uses_at_most_two_to_the_bits_levels_per_sample():
    f = torch.randn(8, 16, 8, 8)
    for bits in (1, 2, 3):
        q = defenses.get("quantization", bits=bits)(f)
        for sample, original in zip(q, f):
            assert len(torch.unique(sample)) <= 2 ** bits
            step = float(original.max() - original.min()) / (2 ** bits - 1)
            assert float((sample - original).abs().max()) <= step / 2 + 1e-5


def test_fixed_range_quantization_clamps_then_rounds():
    f = torch.tensor([[-1.0, 0.1, 0.49, 0.51, 2.0]])
    q = defenses.get("quantization", bits=1, range="fixed", low=0.0, high=1.0)(f)
    assert q.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]


def test_topk_keeps_exactly_the_largest_entries():
    f = torch.randn(4, 10, 5, 5)
    out = defenses.get("topk", keep=0.1)(f)
    k = math.ceil(0.1 * 250)
    for sample, original in zip(out.flatten(1), f.flatten(1)):
        kept = sample != 0
        assert int(kept.sum()) == k
        assert torch.equal(sample[kept], original[kept])
        assert float(original[~kept].abs().max()) <= float(original[kept].abs().min())


def test_dropout_drops_the_requested_fraction_and_keeps_the_mean():
    f = torch.ones(8, 64, 16, 16)
    out = defenses.get("dropout", p=0.3)(f)
    assert float((out == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    assert float(out.mean()) == pytest.approx(1.0, abs=0.02)
    raw = defenses.get("dropout", p=0.3, rescale=False)(f)
    assert set(torch.unique(raw).tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------- pruning

PLANTED = 5  # the channel that carries the label


class PlantedClient(nn.Module):
    """8 channels at the cut: channel PLANTED copies input channel 0 (the label's source); the others are
    large multiples of the uninformative input channels 1..3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1, bias=False)
        w = torch.zeros(8, 4, 1, 1)
        for c in range(8):
            w[c, 1 + c % 3] = 5.0 + c
        w[PLANTED] = 0
        w[PLANTED, 0] = 1.0
        self.conv.weight = nn.Parameter(w)

    def forward(self, x):
        return self.conv(x)


class PlantedServer(nn.Module):
    """Logits from the spatial mean of each channel: strongly from the planted one, weakly from the rest."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)
        w = torch.full((2, 8), 0.01)
        w[:, PLANTED] = torch.tensor([-4.0, 4.0])
        self.fc.weight = nn.Parameter(w)
        self.fc.bias = nn.Parameter(torch.zeros(2))

    def forward(self, f):
        return self.fc(f.mean(dim=(2, 3)))


def planted_data(n: int = 128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 4, 4, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return x, y


@pytest.mark.parametrize("score", ["conductance", "grad_x_activation"])
@pytest.mark.parametrize("objective", ["loss", "logit"])
def test_captum_scores_rank_the_planted_channel_first(score, objective):
    x, y = planted_data()
    pruning = defenses.get("pruning", ratio=0.5, score=score, objective=objective, samples=64)
    pruning.fit(PlantedClient(), PlantedServer(), x, y)
    assert int(pruning.scores.argmax()) == PLANTED
    assert PLANTED not in pruning.removed


def test_magnitude_score_is_fooled_by_large_uninformative_channels():
    x, y = planted_data()
    pruning = defenses.get("pruning", ratio=0.5, score="magnitude")
    pruning.fit(PlantedClient(), PlantedServer(), x, y)
    assert PLANTED in pruning.removed  # why the attribution scores exist


@pytest.mark.parametrize("ratio", [0.125, 0.5, 0.875])
@pytest.mark.parametrize("score", ["random", "magnitude", "grad_x_activation"])
def test_pruning_removes_exactly_the_requested_channels(ratio, score):
    x, y = planted_data()
    client, server = PlantedClient(), PlantedServer()
    pruning = defenses.get("pruning", ratio=ratio, score=score, seed=2)
    assert pruning.fit(client, server, x, y) is server  # no fine-tuning by default
    assert len(pruning.removed) == int(ratio * 8)
    with torch.no_grad():
        f = client(x) + 0.1  # no channel is zero before pruning
        out = pruning(f)
    zero = [c for c in range(8) if bool((out[:, c] == 0).all())]
    assert zero == pruning.removed
    kept = [c for c in range(8) if c not in pruning.removed]
    assert torch.equal(out[:, kept], f[:, kept])


def test_random_pruning_is_seeded():
    x, y = planted_data()
    removed = []
    for seed in (0, 0, 1):
        pruning = defenses.get("pruning", ratio=0.5, score="random", seed=seed)
        pruning.fit(PlantedClient(), PlantedServer(), x, y)
        removed.append(pruning.removed)
    assert removed[0] == removed[1] != removed[2]


def test_pruning_before_fit_fails_clearly():
    with pytest.raises(RuntimeError, match="fit"):
        defenses.get("pruning", ratio=0.5)(torch.randn(2, 8, 4, 4))


def test_finetuning_the_server_on_pruned_features_leaves_the_original_untouched():
    x, y = planted_data()
    client, server = PlantedClient(), PlantedServer()
    before = {k: v.clone() for k, v in server.state_dict().items()}
    pruning = defenses.get("pruning", ratio=0.5, score="random", seed=1, finetune_server=3, finetune_lr=0.1)
    tuned = pruning.fit(client, server, x, y)
    assert tuned is not server
    assert all(torch.equal(before[k], v) for k, v in server.state_dict().items())
    assert not torch.equal(tuned.fc.weight, server.fc.weight)


def test_reseeded_copy_restarts_the_random_stream_and_leaves_the_original_alone():
    defense = defenses.get("gaussian_noise", scale=0.5, seed=3)
    features = torch.ones(2, 4, 3, 3)
    first = defense(features)
    again = defense.reseeded()
    assert torch.equal(again(features), first)  # same seed, stream from the start
    assert not torch.equal(defense(features), first)  # the original's stream went on
    other = defense.reseeded(4)
    assert other.seed == 4 and not torch.equal(other(features), first)
