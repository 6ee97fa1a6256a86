"""The learned inverse network: black-box (queries and auxiliary data only), beats the mean image, cached."""
import pytest
import torch

from leakbench import attacks, defenses
from leakbench.attacks.base import AttackContext, Knowledge
from leakbench.evaluation.attack_context import auxiliary_split, query_oracle
from leakbench.splitnn.errors import ParameterError


@pytest.fixture(scope="module")
def setting(small_split):
    return small_split.data, small_split.client


def _mse(a, b):
    return float((a - b).pow(2).mean())


@pytest.mark.parametrize("name, params", [("none", {}), ("gaussian_noise", {"scale": 0.5})])
def test_inverse_net_beats_the_mean_image_on_held_out_images(setting, name, params):
    data, client = setting
    x = data.x_test[:32]  # held out: the auxiliary data is half of the training set
    with torch.no_grad():
        features = defenses.get(name, **params)(client(x))
    aux = auxiliary_split(data, seed=0)
    query = query_oracle(client, defenses.get(name, **params), 0)
    rec = attacks.get("inverse_net", epochs=8).reconstruct(
        client, features, AttackContext(image_shape=data.shape, auxiliary=aux, query=query))
    baseline = _mse(aux[0].mean(dim=0, keepdim=True).expand_as(x), x)
    assert rec.images.shape == x.shape and float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1
    assert _mse(rec.images, x) < 0.2 * baseline  # measured 0.02x (none) and 0.04x (noise)
    # Each reconstruction is of its own input, not of its class: among the held-out digits the nearest to it
    # is its own for nearly all (measured all 32; chance 1/32, a class-average decoder about 1/3).
    nearest = torch.cdist(rec.images.flatten(1), x.flatten(1)).argmin(dim=1)
    assert float((nearest == torch.arange(len(x))).float().mean()) >= 0.9
    # The recorded losses are per epoch, and the decoder generalises from the auxiliary half: its held-out
    # error is of the order of its last training loss (measured 0.9x), not memorised below it.
    losses = rec.diagnostics["train_losses"]
    assert len(losses) == 8 and _mse(rec.images, x) < 3 * losses[-1]


def test_inverse_net_is_cached_per_model_cut_and_defense(setting, tmp_path):
    data, client = setting
    x = data.x_test[:4]
    with torch.no_grad():
        features = client(x)
    aux = auxiliary_split(data, seed=0)
    calls = []

    def query(images):
        calls.append(len(images))
        with torch.no_grad():
            return client(images)
    attack = attacks.get("inverse_net", epochs=1)
    key = {"model": "m", "cut": "layer1", "defense": {"name": "none", "params": {}}, "seed": 0}
    ctx = dict(image_shape=data.shape, auxiliary=aux, query=query, cache_dir=str(tmp_path), cache_key=key)
    first = attack.reconstruct(client, features, AttackContext(**ctx))
    assert not first.diagnostics["from_cache"] and calls
    calls.clear()
    second = attack.reconstruct(client, features, AttackContext(**ctx))
    assert second.diagnostics["from_cache"] and not calls  # loaded: no queries, same decoder
    assert torch.equal(first.images, second.images)
    other = attack.reconstruct(
        client, features, AttackContext(**{**ctx, "cache_key": {**key, "defense": {"name": "topk"}}}))
    assert not other.diagnostics["from_cache"]
    assert len(list((tmp_path / "attacks").glob("inverse_net-*.pt"))) == 2


def test_inverse_net_declares_black_box_knowledge_and_checks_parameters(setting):
    data, client = setting
    attack = attacks.get("inverse_net")
    assert attack.knowledge == {Knowledge.AUXILIARY_DATA, Knowledge.QUERY_ACCESS}
    with pytest.raises(ParameterError, match="epochs"):
        attacks.get("inverse_net", epochs=-1)
    with pytest.raises(ParameterError, match="hidden"):
        attacks.get("inverse_net", hidden=0)
    with pytest.raises(ValueError, match="auxiliary"):
        attack.reconstruct(client, client(data.x_test[:2]), AttackContext(image_shape=data.shape))
