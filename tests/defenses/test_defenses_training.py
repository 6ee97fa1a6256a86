"""Training defenses (dp_sgd, groupnorm_baseline, nopeek) as hooks of the one loop, the runner and the CLI. That
one at its declared strength zero trains the plain model is the contract suite's
(tests/contracts/test_defense_contracts.py)."""
import json
import math
import textwrap
from dataclasses import asdict

import pytest
import torch
from torch import nn

from harness import ROOT
from leakbench import defenses
from leakbench.defenses.dp_sgd import PrivacyBudgetExceeded
from leakbench.defenses.nopeek import distance_correlation
from leakbench.evaluation import Matrix, ResultStore, load_config
from leakbench.evaluation.cli import main
from leakbench.splitnn import ParameterError, TrainConfig, datasets, split, train
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.split import max_split_error
from leakbench.splitnn.training import config_hash, fit


@pytest.fixture(scope="module")
def small_digits() -> Dataset:
    """Digits at 16x16: the same task, four times cheaper to train on."""
    return datasets.get("digits", size=16)


# ---------------------------------------------------------------- distance correlation

@pytest.mark.parametrize("n, dx, dy, dependent", [(20, 3, 2, True), (40, 7, 1, False), (64, 12, 30, True)])
def test_distance_correlation_matches_the_dcor_package(n, dx, dy, dependent):
    dcor = pytest.importorskip("dcor", reason="dcor is in the test extra; without it this cross-check is skipped")
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = torch.randn(n, dy, generator=g, dtype=torch.float64)
    if dependent:
        y = y * 0.1 + x[:, :1].pow(2)
    expected = dcor.distance_correlation(x.numpy(), y.numpy())
    assert float(distance_correlation(x, y)) == pytest.approx(expected, abs=1e-9)


def test_distance_correlation_is_differentiable_and_bounded():
    x = torch.randn(16, 3, 8, 8)
    w = torch.randn(3, 5, requires_grad=True)
    f = torch.einsum("nchw,cd->ndhw", x, w)
    d = distance_correlation(x, f)
    d.backward()
    assert 0.0 <= float(d) <= 1.0 + 1e-6 and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- the train() hook

def test_plain_configs_keep_their_checkpoint_hash():
    config = TrainConfig("resnet20", "digits", epochs=1)
    legacy = {k: v for k, v in asdict(config).items() if k not in ("defense", "cut", "weights")}  # added later
    assert config.key() == config_hash(legacy)
    assert TrainConfig("resnet20", "digits", epochs=1, defense={"name": "groupnorm_baseline"}).key() != config.key()


@pytest.mark.parametrize("defense, cut, key", [
    ({"name": "gaussian_noise", "params": {}}, None, "defense.name"),   # a transform defense does not train
    ({"name": "nopeek", "params": {"alpha": 1.0}}, None, "cut"),        # NoPeek needs the cut
    ({"name": "dp_sgd", "params": {"epsilon": 0.0}}, None, "epsilon"),
    ({"name": "dp_sgd", "params": {"delta": 1.0}}, None, "delta"),
    ({"name": "dp_sgd", "params": {"accountant": "moments"}}, None, "accountant"),
    ({"name": "nopeek", "params": {"alpha": -1.0}}, "layer1", "alpha"),
])
def test_bad_training_defenses_fail_when_their_hooks_are_built(defense, cut, key):
    with pytest.raises(ParameterError) as info:
        defenses.hooks_for(TrainConfig("resnet20", "digits", defense=defense, cut=cut))
    assert info.value.key == key


def test_train_needs_the_hooks_its_config_names_and_only_those(tmp_path):
    data = datasets.get("digits", size=8)
    named = TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=0, defense={"name": "nopeek"},
                        cut="layer1")
    with pytest.raises(ParameterError, match="nopeek") as info:
        train(named, tmp_path, data=data, progress=False)  # without hooks it would be plain training
    assert info.value.key == "hooks"
    plain = TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=0)
    with pytest.raises(ParameterError) as info:  # hooks under a plain config's checkpoint name
        train(plain, tmp_path, hooks=defenses.hooks_for(named), data=data, progress=False)
    assert info.value.key == "hooks"
    assert not (tmp_path / "models").exists()
    trained = train(named, tmp_path, hooks=defenses.hooks_for(named), data=data, progress=False)
    assert trained.hooks.cut == "layer1" and trained.hooks.seed == named.seed


def test_dp_sgd_trains_a_groupnorm_model_within_its_budget(small_digits, tmp_path):
    config = TrainConfig("resnet20", "digits", dataset_params=small_digits.params, epochs=1, batch_size=128,
                         lr=0.1, defense={"name": "dp_sgd", "params": {"epsilon": 4.0, "delta": 1e-5}})
    trained = train(config, tmp_path, hooks=defenses.hooks_for(config), data=small_digits, progress=False)
    modules = list(trained.model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert any(isinstance(m, nn.GroupNorm) for m in modules)
    g, report = trained.hooks.guarantee(), trained.hooks.report
    # Opacus calibrates the noise so that the planned steps spend the target, to its search tolerance (0.01)
    assert 4.0 - 0.01 <= g["epsilon"] <= 4.0 and g["epsilon_target"] == 4.0
    # and the epsilon recorded is the RDP accounting of the noise, sampling rate and steps recorded beside it
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    assert report["steps"] == round(1 / report["sample_rate"])  # one epoch of Poisson-sampled batches
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=report["sample_rate"], noise_multiplier=report["noise_multiplier"],
                      steps=report["steps"], orders=orders)
    assert g["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=1e-6)
    assert g["delta"] == 1e-5 and g["accountant"] == "rdp" and "GroupNorm" in g["architecture"]
    assert g["noise_multiplier"] > 0
    # no Opacus leftovers: the model splits exactly and has no hooks or per-sample gradients
    assert not any(hasattr(p, "grad_sample") for p in trained.model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in modules)
    client, server = split(trained.model, "layer1")
    assert max_split_error(trained.model, client, server, small_digits.x_test[:4]) == 0.0
    # the cache brings back the same weights and the epsilon the accountant reached
    again = train(config, tmp_path, hooks=defenses.hooks_for(config), data=small_digits, progress=False)
    assert again.from_cache and again.hooks.guarantee()["epsilon"] == g["epsilon"]
    assert json.loads(trained.path.with_suffix(".json").read_text())["defense_report"]["epsilon_spent"] == g["epsilon"]


def test_dp_sgd_fails_clearly_when_the_accountant_exceeds_the_target(monkeypatch):
    import opacus

    monkeypatch.setattr(opacus.PrivacyEngine, "get_epsilon", lambda self, delta: 99.0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    dp = defenses.get("dp_sgd", epsilon=2.0, epochs=1)
    model = dp.prepare_model(model)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 2, (64,))
    with pytest.raises(PrivacyBudgetExceeded, match="99"):
        fit(model, x, y, epochs=3, lr=0.05, batch_size=16, weight_decay=0.0, seed=0, progress=False, hooks=dp)


class _LearningRates:
    """Records the learning rate of every step the loop takes, from inside its loss term."""

    def wrap(self, model, optimizer, loader, *, epochs):
        model, optimizer, loader = super().wrap(model, optimizer, loader, epochs=epochs)
        self.optimizer, self.lrs = optimizer, []
        return model, optimizer, loader

    def loss_term(self, model, x, y, outputs):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        return super().loss_term(model, x, y, outputs)


def test_dp_sgd_and_its_baseline_train_with_the_same_loop_and_schedule():
    """Both hook the one loop: the same number of steps and the same cosine learning rates at every step."""
    spies = {}
    for name in ("dp_sgd", "groupnorm_baseline"):
        spy = type(f"Spy_{name}", (_LearningRates, defenses.defense_class(name)), {})()
        model = spy.prepare_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                                nn.Linear(4 * 36, 2)))
        x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 2, (64,))
        fit(model, x, y, epochs=3, lr=0.1, batch_size=16, weight_decay=0.0, seed=0, progress=False, hooks=spy)
        spies[name] = spy.lrs
    steps = 3 * 4
    cosine = [0.1 * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
    assert spies["dp_sgd"] == pytest.approx(cosine, rel=1e-6)
    assert spies["groupnorm_baseline"] == pytest.approx(cosine, rel=1e-6)


def test_groupnorm_baseline_is_the_same_architecture_without_dp():
    dp = defenses.get("dp_sgd").prepare_model(_resnet())
    base = defenses.get("groupnorm_baseline").prepare_model(_resnet())
    assert [type(m) for m in dp.modules()] == [type(m) for m in base.modules()]
    assert defenses.get("groupnorm_baseline").guarantee() == {}


def _resnet() -> nn.Module:
    from leakbench.splitnn import zoo
    return zoo.get("resnet20", num_classes=10)


def test_nopeek_lowers_distance_correlation_at_the_cut(small_digits, tmp_path):
    common = dict(model="resnet20", dataset="digits", dataset_params=small_digits.params, epochs=2, batch_size=64)
    plain = train(TrainConfig(**common), tmp_path, data=small_digits, progress=False)
    config = TrainConfig(**common, defense={"name": "nopeek", "params": {"alpha": 1.0}}, cut="layer1")
    nopeek = train(config, tmp_path, hooks=defenses.hooks_for(config), data=small_digits, progress=False)
    x = small_digits.x_test[:128]
    with torch.no_grad():
        d_plain = float(distance_correlation(x, split(plain.model, "layer1")[0](x)))
        d_nopeek = float(distance_correlation(x, split(nopeek.model, "layer1")[0](x)))
    assert d_nopeek < d_plain - 0.02, (d_plain, d_nopeek)
    assert nopeek.hooks.report["cut"] == "layer1" and nopeek.hooks.guarantee() == {}
    assert 0 < nopeek.hooks.report["final_epoch_dcor"] < 1


# ---------------------------------------------------------------- runner, YAML and CLI

CONFIG = """
name: tiny-defenses
seed: 0
dataset: {name: digits, params: {size: 16}}
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses:
  - none
  - {name: pruning, params: {ratio: 0.5, score: grad_x_activation, samples: 32}}
  - {name: nopeek, params: {alpha: 1.0}}
  - {name: groupnorm_baseline}
  - {name: dp_sgd, params: {epsilon: 8.0, epochs: 1}}
attacks:
  - {name: rmle, params: {iterations: 5}}
  - {name: peel, params: {max_iter: 5, fixed_point_iters: 5}}
evaluation: {num_images: 2}
"""


def test_runner_trains_per_training_defense_fits_pruning_and_records_guarantees(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    config = load_config(path)
    cells = config.cells()
    keys = {c["defense"]["name"]: c.train_config().key() for c in cells}
    assert keys["pruning"] == keys["none"]  # transform defenses share the undefended model
    assert len({keys[n] for n in ("none", "nopeek", "groupnorm_baseline", "dp_sgd")}) == 4
    assert cells[4].train_config().cut == "layer1" and cells[6].train_config().cut is None
    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = Matrix(config, progress=False).run(store)  # the session's cache: its judge is trained once
        rows = store.cells()
    assert summary.failed == 0, rows[rows.status == "failed"].reason.tolist()
    by = {(r.defense, r.attack): r for r in rows.itertuples()}
    # every cell runs, PEEL on the GroupNorm models of DP-SGD and its baseline too (GroupNorm stays a module)
    for defense in ("none", "pruning", "nopeek", "groupnorm_baseline", "dp_sgd"):
        for attack in ("rmle", "peel"):
            assert by[(defense, attack)].status == "done" and math.isfinite(by[(defense, attack)].psnr)
    guarantee = json.loads(by[("dp_sgd", "rmle")].guarantee_json)
    assert guarantee["epsilon"] <= 8.0 and guarantee["accountant"] == "rdp" and guarantee["delta"] == 1e-5
    diagnostics = json.loads(by[("pruning", "rmle")].diagnostics_json)
    assert len(diagnostics["defense"]["removed_channels"]) == 8


def test_defenses_yaml_is_valid_and_covers_every_defense_at_two_strengths():
    config = load_config(ROOT / "experiments" / "defenses.yaml")
    used: dict[str, int] = {}
    for spec in config.defenses:
        used[spec["name"]] = used.get(spec["name"], 0) + 1
    for name in defenses.names():
        if not defenses.defense_class(name).baseline:
            assert used.get(name, 0) >= 2, name
    assert {a["name"] for a in config.attacks} == {"peel", "rmle"}


def test_cli_lists_every_defense_with_kind_and_guarantee(capsys):
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    for name in defenses.names():
        assert name in out
    assert "training" in out and "per released feature vector" in out and "ratio=0.5" in out
