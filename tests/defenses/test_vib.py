"""The variational information bottleneck (defenses/vib.py): beta 0 is plain training and releases the features as
computed; a larger beta releases noisier features at an accuracy cost; the noise is fresh per call, replayed by a
reseeded copy and by a defense the checkpoint cache restored; its noise law is the noise it adds."""
import pytest
import torch

import harness
from leakbench import defenses
from leakbench.defenses.vib import gaussian_kl
from leakbench.splitnn import ParameterError, TrainConfig, split, train
from leakbench.splitnn.model import SplitModel
from leakbench.splitnn.training import accuracy

EPOCHS = 1


def _config(data, beta=None) -> TrainConfig:
    defense = None if beta is None else {"name": "vib", "params": {"beta": beta}}
    return TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=EPOCHS, batch_size=64,
                       defense=defense, cut="layer1" if defense else None)


def _train(data, cache, beta=None):
    config = _config(data, beta)
    return train(config, cache, hooks=defenses.hooks_for(config), data=data, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Plain, beta 0.01 and beta 1 models (one epoch on 16x16 digits) in one checkpoint cache."""
    data, cache = harness.digits16(), tmp_path_factory.mktemp("vib")
    return data, cache, {beta: _train(data, cache, beta) for beta in (None, 0.01, 1.0)}


def _noise_to_signal(model, defense, x) -> float:
    client = split(model, "layer1")[0]
    with torch.no_grad():
        f = client(x)
        return float((defense(f) - f).pow(2).mean().sqrt() / f.pow(2).mean().sqrt())


def test_beta_zero_trains_the_plain_model_and_releases_its_features(trained):
    data, cache, models = trained
    zero = _train(data, cache, 0.0)
    plain = models[None].model.state_dict()
    assert not zero.from_cache and zero.model.state_dict().keys() == plain.keys()
    assert all(torch.equal(zero.model.state_dict()[k], plain[k]) for k in plain)
    features = split(zero.model, "layer1")[0](data.x_test[:4])
    assert torch.equal(zero.hooks(features), features)
    assert zero.hooks.noise_law() is None and "log_variance" not in zero.hooks.report


def test_a_larger_beta_releases_noisier_features_at_an_accuracy_cost(trained):
    data, _, models = trained
    x = data.x_test[:256]
    nsr = {beta: _noise_to_signal(models[beta].model, models[beta].hooks, x) for beta in (0.01, 1.0)}
    acc = {beta: accuracy(SplitModel(*split(m.model, "layer1"), m.hooks.reseeded() if beta else None),
                          data.x_test, data.y_test) for beta, m in models.items()}
    assert 0 < nsr[0.01] < nsr[1.0] / 2, nsr
    assert acc[1.0] < acc[None] - 0.02, acc
    kl = {beta: models[beta].hooks.report["final_epoch_kl"] for beta in (0.01, 1.0)}
    assert kl[1.0] < kl[0.01], kl  # less information at the cut, by the variational bound too


def test_the_noise_is_fresh_per_call_and_replayed_by_a_reseeded_copy(trained):
    data, _, models = trained
    vib = models[1.0].hooks
    features = split(models[1.0].model, "layer1")[0](data.x_test[:8]).detach()
    copy = vib.reseeded()
    first, second = copy(features), copy(features)
    assert not torch.equal(first, second)
    assert torch.equal(vib.reseeded()(features), first)
    assert not torch.equal(vib.reseeded(7)(features), first)
    # the noise law's std is the noise's: (z - f) / std is standard normal
    law = vib.noise_law()
    unit = (first - law.mean(features)) / law.std(features)
    assert abs(float(unit.mean())) < 0.05 and abs(float(unit.std()) - 1) < 0.05


def test_the_cache_restores_sigma_and_the_same_release(trained):
    data, cache, models = trained
    fresh = models[1.0].hooks
    again = _train(data, cache, 1.0)
    assert again.from_cache and torch.equal(again.hooks.log_variance, fresh.log_variance)
    assert again.hooks.report == fresh.report and len(fresh.report["noise_std"]) == 16
    features = split(again.model, "layer1")[0](data.x_test[:4]).detach()
    assert torch.equal(again.hooks.reseeded()(features), fresh.reseeded()(features))


def test_gaussian_kl_matches_torch_distributions():
    mean, log_variance = torch.randn(3, 4, 2, 2), torch.randn(1, 4, 1, 1)
    q = torch.distributions.Normal(mean, (0.5 * log_variance).exp().expand_as(mean))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    assert float(gaussian_kl(mean, log_variance)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("params, cut, key", [({"beta": -1.0}, "layer1", "beta"), ({"beta": 0.1}, None, "cut")])
def test_bad_settings_fail_when_the_hooks_are_built(params, cut, key):
    with pytest.raises(ParameterError) as info:
        defenses.hooks_for(TrainConfig("resnet20", "digits", defense={"name": "vib", "params": params}, cut=cut))
    assert info.value.key == key


def test_dfil_reads_the_noise_law_of_a_trained_vib(trained):
    """A training defense that releases noise gets a finite bound; one that declares no law stays unbounded."""
    from leakbench.evaluation import dfil

    data, _, models = trained
    features = split(models[1.0].model, "layer1")[0](data.x_test[:2]).detach()
    assert not isinstance(dfil.noise_law(models[1.0].hooks, features), str)
    assert isinstance(dfil.noise_law(defenses.get("nopeek", alpha=0.5), features), str)
