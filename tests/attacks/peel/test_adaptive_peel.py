"""Defense-aware PEEL (``attacks.get("peel", adaptive=True)``): at least as good as plain PEEL against every
transform defense, strictly better against noise, plain PEEL against a defense without a registered reader."""
import pytest
import torch

from harness import psnr
from leakbench import attacks, defenses
from leakbench.attacks.base import AttackContext, Knowledge, PublicDefense
from leakbench.attacks.peel.readers import read_defense
from leakbench.attacks.peel import Masked, Noisy, register_reader
from leakbench.attacks.peel.readers import _readers
from leakbench.defenses import base as defense_base
from leakbench.splitnn.errors import ParameterError

BUDGET = {"max_iter": 30, "refine_iter": 150}


@pytest.fixture(scope="module")
def setting(small_split):
    return small_split.data, small_split.client, small_split.server, small_split.data.x_test[:4]


def _both(setting, defense):
    data, client, server, x = setting
    if defense.needs_fit:
        defense.fit(client, server, data.x_train, data.y_train)
    with torch.no_grad():
        features = defense(client(x))
    public = PublicDefense.of(defense)
    plain = attacks.get("peel", **BUDGET).reconstruct(
        client, features, AttackContext(image_shape=data.shape, defense=public))
    adaptive = attacks.get("peel", adaptive=True, **BUDGET).reconstruct(
        client, features, AttackContext(image_shape=data.shape, defense=public))
    return psnr(plain.images, x), psnr(adaptive.images, x), adaptive


@pytest.mark.parametrize("name, params", [("gaussian_noise", {"scale": 0.1}), ("gaussian_noise", {"scale": 0.5}),
                                          ("laplace_noise", {"scale": 0.1})])
def test_adaptive_peel_is_strictly_better_against_noise(setting, name, params):
    plain, adaptive, rec = _both(setting, defenses.get(name, **params))
    assert rec.diagnostics["adaptive"]["model"] == "noise"
    assert adaptive > plain + 1.0, (plain, adaptive)


@pytest.mark.parametrize("name, params", [("none", {}), ("quantization", {"bits": 4}), ("quantization", {"bits": 2}),
                                          ("topk", {"keep": 0.2}), ("dropout", {"p": 0.2}),
                                          ("pruning", {"ratio": 0.5, "samples": 64})])
def test_adaptive_peel_is_at_least_as_good_against_transforms(setting, name, params):
    plain, adaptive, _ = _both(setting, defenses.get(name, **params))
    assert adaptive >= plain - 0.05, (plain, adaptive)  # equal up to solver round-off where nothing changes


#: The base of a feature defense (``FeatureDefense`` once the defenses have two bases; ``Defense`` before).
FeatureBase = getattr(defense_base, "FeatureDefense", defense_base.Defense)


class _Mystery(FeatureBase):
    """A transform PEEL has no model of."""

    name = "mystery"

    def transform(self, features):
        return features * 0.9


def test_unknown_defense_is_plain_peel_and_says_so(setting):
    data, client, _, x = setting
    defense = _Mystery()
    with torch.no_grad():
        features = defense(client(x))
    public = PublicDefense.of(defense)
    plain = attacks.get("peel", **BUDGET).reconstruct(
        client, features, AttackContext(image_shape=data.shape, defense=public))
    adaptive = attacks.get("peel", adaptive=True, **BUDGET).reconstruct(
        client, features, AttackContext(image_shape=data.shape, defense=public))
    assert torch.equal(plain.images, adaptive.images)
    assert adaptive.diagnostics["adaptive"]["model"] == "unknown"
    assert "plain PEEL" in adaptive.diagnostics["adaptive"]["note"] and "_Mystery" in adaptive.diagnostics[
        "adaptive"]["note"]


class _HalfMasked(FeatureBase):
    """A third-party defense: it zeroes the second half of the channels and says so, with its own reader."""

    name = "half_masked"

    def transform(self, features):
        keep = torch.arange(features.shape[1]) < features.shape[1] // 2
        return features * keep.view(1, -1, *([1] * (features.dim() - 2)))


@pytest.fixture
def half_masked_reader():
    @register_reader(_HalfMasked)  # registered beside the defense, keyed by its class
    def read(defense, observed):
        keep = torch.arange(observed.shape[1]) < observed.shape[1] // 2
        mask = keep.view(1, -1, *([1] * (observed.dim() - 2))).expand_as(observed)
        return Masked(observed, defense.name, "the first half of the channels", mask=mask)
    yield read
    _readers.pop(_HalfMasked, None)


def test_a_third_party_defense_registers_its_reader_beside_itself(setting, half_masked_reader):
    data, client, _, x = setting
    defense = _HalfMasked()
    with torch.no_grad():
        features = defense(client(x[:2]))
    context = AttackContext(image_shape=data.shape, defense=defense)
    few = {"max_iter": 10, "refine_iter": 20}
    aware = attacks.get("peel", adaptive=True, **few).reconstruct(client, features, context)
    assert aware.diagnostics["adaptive"]["model"] == "masked"
    assert aware.diagnostics["adaptive"]["note"] == "the first half of the channels"
    assert aware.diagnostics["stages"][-1]["kind"] == "adaptive masked"  # the cut is fitted on what it released
    del _readers[_HalfMasked]  # without its reader the same defense is plain PEEL, and the row says so
    plain = attacks.get("peel", adaptive=True, **few).reconstruct(client, features, context)
    assert plain.diagnostics["adaptive"]["model"] == "unknown"
    assert not torch.equal(plain.images, aware.images)
    _readers[_HalfMasked] = half_masked_reader


def test_a_subclass_is_read_by_its_base_class_reader():
    class Louder(defenses.noise.GaussianNoise):
        name = "louder"
    observed = torch.rand(2, 4, 3, 3)
    reading = attacks.peel.read_defense(PublicDefense.of(Louder(scale=0.2)), observed)
    assert isinstance(reading, Noisy) and reading.defense == "louder"
    assert attacks.peel.reader_for(Louder) is attacks.peel.reader_for(defenses.noise.GaussianNoise)


def test_the_readings_hold_the_clean_features(setting):
    """Quantization bins contain the clean features; the noise level is estimated from the observation."""
    _, client, _, x = setting
    with torch.no_grad():
        clean = client(x).double()
    for bits in (2, 4):
        quantize = defenses.get("quantization", bits=bits)
        reading = read_defense(PublicDefense.of(quantize), quantize(clean))
        assert bool(((reading.low <= clean + 1e-9) & (clean <= reading.high + 1e-9)).all())
    noise = defenses.get("gaussian_noise", scale=0.3)
    reading = read_defense(PublicDefense.of(noise), noise(clean))
    true_sigma = 0.3 * clean.flatten(1).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(reading.sigma.flatten(), true_sigma, rtol=0.05)
    assert reading.relative_noise.shape == (len(clean),)  # per sample
    assert float(reading.relative_noise.mean()) == pytest.approx(0.3, rel=0.05)


class _Replayable(defenses.noise.GaussianNoise):
    """Gaussian noise whose random stream an attacker must not touch: reading it fails the test."""

    def generator(self, device):
        if getattr(self, "sealed", False):
            raise AssertionError("the attack reached the defense's random state")
        return super().generator(device)


def test_adaptive_peel_never_reaches_the_defense_random_state(setting):
    data, client, _, x = setting
    defense = _Replayable(scale=0.3)
    with torch.no_grad():
        features = defense(client(x[:2]))
    defense.sealed = True
    public = PublicDefense.of(defense)
    assert (public.name, public.kind, public.params) == ("gaussian_noise", "transform", defense.params)
    assert not hasattr(public, "generator") and not hasattr(public, "_generator")
    public.params["scale"] = 9.0
    assert defense.scale == 0.3  # the attacker holds a copy of the public parameters
    with pytest.raises(TypeError, match="PublicDefense"):
        read_defense(defense, features)
    peel = attacks.get("peel", adaptive=True, max_iter=5, refine_iter=5)
    rec = peel.reconstruct(
        client, features, AttackContext(image_shape=data.shape, defense=defense))  # converted at the boundary
    assert rec.diagnostics["adaptive"]["model"] == "noise"


def test_adaptive_knowledge_and_parameters():
    assert Knowledge.DEFENSE in attacks.get("peel", adaptive=True).knowledge
    assert Knowledge.DEFENSE not in attacks.get("peel").knowledge  # the class keeps plain PEEL's knowledge
    assert Knowledge.DEFENSE not in attacks.PEEL.base_knowledge
    with pytest.raises(ParameterError, match="adaptive"):
        attacks.get("peel", adaptive="yes")
    with pytest.raises(ParameterError, match="tv_prior"):
        attacks.get("peel", adaptive=True, tv_prior=-1)


def test_a_training_defense_without_a_reader_is_read_as_exact():
    """A training defense changes the weights, not what is released: the exact fit, and the note says why."""
    y = torch.rand(2, 4, 3, 3)
    reading = read_defense(PublicDefense("some_training_defense", "training", {}), y)
    assert reading.kind == "exact" and not reading.changes_fit and "training defense" in reading.note
    unknown = read_defense(PublicDefense("some_transform", "transform", {}), y)
    assert unknown.diagnostics()["model"] == "unknown" and "plain PEEL" in unknown.note


def test_learned_noise_is_read_as_noise_of_its_public_power(small_split):
    """learned_noise's gains are secret, but their mean power is 1: the reader gives noise at its public scale,
    its σ estimated per sample from the observed RMS as for relative Gaussian noise."""
    data, client, server = small_split.data, small_split.client, small_split.server
    defense = defenses.get("learned_noise", scale=0.5, epochs=1, samples=256)
    defense.fit(client, server, data.x_train, data.y_train)
    with torch.no_grad():
        clean = client(data.x_test[:16])
        observed = defense(clean)
    reading = read_defense(PublicDefense.of(defense), observed)
    assert isinstance(reading, Noisy)
    true_sigma = 0.5 * clean.flatten(1).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(reading.sigma.flatten(), true_sigma, rtol=0.1)
    assert float(reading.relative_noise.mean()) == pytest.approx(0.5, rel=0.1)
