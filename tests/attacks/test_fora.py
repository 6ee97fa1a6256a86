"""The FORA/SDAR-style substitute-client attacker: auxiliary data and the observed features only; beats the mean
image on held-out digits; its substitute shares no tensor with the target, and the target's weights never reach
it; its MK-MMD agrees with a direct sum."""
import copy
import math

import pytest
import torch

from leakbench import attacks
from leakbench.attacks.base import AttackContext, Knowledge
from leakbench.attacks.fora import mk_mmd
from leakbench.contracts import MissingContext
from leakbench.evaluation.attack_context import auxiliary_split


def _mse(a, b):
    return float((a - b).pow(2).mean())


@pytest.fixture(scope="module")
def setting(small_split):
    data, client = small_split.data, small_split.client
    return data, client, auxiliary_split(data, seed=0)


def test_fora_beats_the_mean_image_and_its_substitute_shares_nothing_with_the_target(setting, tmp_path):
    data, client, aux = setting
    x = data.x_test[:32]  # held out: the auxiliary data is half of the training set
    with torch.no_grad():
        features = client(x)
    attack = attacks.get("fora", substitute_epochs=5, decoder_epochs=8)
    context = AttackContext(image_shape=data.shape, auxiliary=aux, cache_dir=str(tmp_path), cache_key={"m": 1})
    rec = attack.reconstruct(client, features, context)
    baseline = _mse(aux[0].mean(dim=0, keepdim=True).expand_as(x), x)
    assert rec.images.shape == x.shape and 0 <= float(rec.images.min()) <= float(rec.images.max()) <= 1
    # measured 0.16x (at 10 and 15 epochs, the MMD alone: 0.08x); an untrained substitute (0 epochs) 5.0x
    assert _mse(rec.images, x) < 0.3 * baseline
    losses = rec.diagnostics["train_losses"]["substitute"]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]  # the MMD to the observed features falls

    pair, _, from_cache = attack.fit(client, features, context)  # the same substitute, from the cache
    assert from_cache
    mine, target = pair["substitute"].state_dict(), client.state_dict()
    assert mine.keys() == target.keys()  # the client's architecture
    storage = {t.untyped_storage().data_ptr() for t in target.values()}
    assert not storage & {t.untyped_storage().data_ptr() for t in mine.values()}
    assert [k for k, v in target.items() if v.is_floating_point() and torch.equal(mine[k], v)] == []


def test_fora_is_cached_per_observed_features(setting, tmp_path):
    data, client, aux = setting
    with torch.no_grad():
        features = client(data.x_test[:4])
    attack = attacks.get("fora", substitute_epochs=1, decoder_epochs=1)
    context = AttackContext(image_shape=data.shape, auxiliary=(aux[0][:64], aux[1][:64]), cache_dir=str(tmp_path),
                            cache_key={"m": 1})
    assert [attack.fit(client, f, context)[2] for f in (features, features, features[:3], features + 1e-3)] == \
        [False, True, False, False]  # the substitute is fitted to the features: other ones, another substitute


def test_fora_never_reads_the_client_weights(setting):
    """Every weight of the target perturbed, the observed features kept: the reconstruction is the same, bit for
    bit (an attacker that read any weight, or started from the target's, would change)."""
    data, client, aux = setting
    with torch.no_grad():
        features = client(data.x_test[:8])
    perturbed = copy.deepcopy(client)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in perturbed.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor + torch.randn(tensor.shape, generator=generator))
    attack = attacks.get("fora", substitute_epochs=2, decoder_epochs=1)
    context = AttackContext(image_shape=data.shape, auxiliary=(aux[0][:128], aux[1][:128]))
    first = attack.reconstruct(client, features, context).images
    assert torch.equal(first, attack.reconstruct(perturbed, features, context).images)
    assert not torch.equal(first, attacks.get("fora", substitute_epochs=2, decoder_epochs=1, seed=1)
                           .reconstruct(client, features, context).images)  # the seed does matter


def test_fora_declares_auxiliary_data_and_the_server_only_for_its_task_loss(setting):
    data, client, aux = setting
    assert attacks.get("fora").knowledge == {Knowledge.AUXILIARY_DATA}
    assert attacks.get("fora", task_weight=0.5).knowledge == {Knowledge.AUXILIARY_DATA, Knowledge.SERVER_WEIGHTS}
    with pytest.raises(MissingContext, match="server"):
        attacks.get("fora", task_weight=0.5).reconstruct(
            client, client(data.x_test[:2]), AttackContext(image_shape=data.shape, auxiliary=aux))


def test_mk_mmd_is_the_direct_sum_of_gaussian_kernels():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, generator=generator, dtype=torch.float64), \
        torch.randn(4, 7, generator=generator, dtype=torch.float64) + 0.5
    z = torch.cat([x, y])
    d2 = [[float((a - b).pow(2).sum()) for b in z] for a in z]
    scale = sum(map(sum, d2)) / (9 * 8)

    def k(i, j):
        return sum(math.exp(-d2[i][j] / (scale * 2.0 ** (s - 1))) for s in range(3))

    def mean(rows, cols):
        return sum(k(i, j) for i in rows for j in cols) / (len(rows) * len(cols))
    reference = mean(range(5), range(5)) + mean(range(5, 9), range(5, 9)) - 2 * mean(range(5), range(5, 9))
    assert float(mk_mmd(x, y, kernels=3)) == pytest.approx(reference, rel=1e-10)
    assert float(mk_mmd(x, x)) == pytest.approx(0.0, abs=1e-12)
    assert float(mk_mmd(x, y + 3)) > float(mk_mmd(x, y)) > 0


def test_fora_discriminator_is_trained_against_the_substitute(setting, tmp_path, monkeypatch):
    """With discriminator_weight > 0 a critic steps once per substitute step, on the observed features against
    the substitute's; at 0 none is built. The substitute's losses then carry the adversarial term."""
    import leakbench.attacks.fora as fora
    data, client, aux = setting
    with torch.no_grad():
        features = client(data.x_test[:8])
    steps = []
    real_step = fora.critic_step
    monkeypatch.setattr(fora, "critic_step", lambda *a: steps.append(real_step(*a)) or steps[-1])
    small = (aux[0][:128], aux[1][:128])
    context = AttackContext(image_shape=data.shape, auxiliary=small)
    plain = attacks.get("fora", substitute_epochs=2, decoder_epochs=1, discriminator_weight=0.0).reconstruct(
        client, features, context)
    assert steps == []
    adversarial = attacks.get("fora", substitute_epochs=2, decoder_epochs=1, discriminator_weight=1.0).reconstruct(
        client, features, context)
    assert len(steps) == 2 * math.ceil(128 / 64) and all(math.isfinite(v) for v in steps)
    assert adversarial.diagnostics["train_losses"]["substitute"] != plain.diagnostics["train_losses"]["substitute"]
    assert attacks.get("fora", discriminator_weight=1.0).knowledge == {Knowledge.AUXILIARY_DATA}
