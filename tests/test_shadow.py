"""The query-free shadow attacker: server half and auxiliary data only; recognisable digits undefended."""
import pytest
import torch

import attacks
from attack_fixtures import digits16, trained_split
from attacks.base import Knowledge
from attacks.shadow import fresh_copy
from evaluation.attack_context import auxiliary_split
from evaluation.eval_classifier import get_evaluation_classifier
from splitnn.errors import ParameterError


@pytest.fixture(scope="module")
def setting():
    data = digits16()
    _, client, server = trained_split(data)
    return data, client, server


def test_fresh_copy_keeps_the_architecture_not_the_weights(setting):
    _, client, _ = setting
    shadow = fresh_copy(client, seed=0)
    assert [type(m) for m in list(shadow.modules())[1:]] == [type(m) for m in list(client.modules())[1:]]
    for (_, a), (_, b) in zip(shadow.state_dict().items(), client.state_dict().items()):
        assert a.shape == b.shape
    conv = [k for k in client.state_dict() if k.endswith("conv1.weight")][0]
    assert not torch.allclose(shadow.state_dict()[conv], client.state_dict()[conv])


@pytest.mark.parametrize("inverter", ["rmle", "peel"])
def test_shadow_recovers_recognisable_digits_undefended(setting, inverter):
    data, client, server = setting
    x, y = data.x_test[:20], data.y_test[:20]
    with torch.no_grad():
        features = client(x)
    rec = attacks.get("shadow", inverter=inverter, epochs=6, iterations=150).reconstruct(
        client, features, image_shape=data.shape, auxiliary=auxiliary_split(data, seed=0), server=server)
    assert rec.diagnostics["shadow_auxiliary_accuracy"] > 0.8  # the shadow serves the frozen server
    judge = get_evaluation_classifier(data, target_model="resnet20", train_params={"epochs": 3, "batch_size": 64})
    top1 = sum(judge.classifier_metrics(rec.images, y)["attack_top1"]) / len(y)
    assert top1 > 0.1  # chance is 0.1
    assert rec.images.shape == x.shape and float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1


def test_shadow_declares_query_free_knowledge_and_checks_parameters(setting):
    data, client, _ = setting
    assert attacks.get("shadow").knowledge == {Knowledge.SERVER_WEIGHTS, Knowledge.AUXILIARY_DATA}
    with pytest.raises(ParameterError, match="inverter"):
        attacks.get("shadow", inverter="gan")
    with pytest.raises(ValueError, match="server"):
        attacks.get("shadow").reconstruct(client, client(data.x_test[:2]), image_shape=data.shape,
                                          auxiliary=auxiliary_split(data, 0))
