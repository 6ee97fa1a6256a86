"""UnSplit, the data-oblivious attacker: it knows the client's architecture and nothing else. Its copy shares no
tensor with the target, its result does not depend on the target's weights at all, and fitting the copy is what
lets it reproduce the features (a random copy alone cannot)."""
import copy

import pytest
import torch

from harness import digits16, randomise_batchnorm
from leakbench import attacks
from leakbench.attacks.base import AttackContext
from leakbench.splitnn import split, zoo

#: A few rounds: the weight checks need the algorithm's every step, not a good reconstruction.
FEW = {"rounds": 3, "image_steps": 3, "model_steps": 3}


@pytest.fixture(scope="module")
def setting():
    """A random ResNet-20 (BatchNorm statistics non-trivial, as trained ones are) cut after layer1, and the
    features of 8 held-out digits through it."""
    data = digits16()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        client = split(zoo.get("resnet20").eval(), "layer1")[0].eval()
    randomise_batchnorm(client)
    images = data.x_test[:8]
    with torch.no_grad():
        features = client(images)
    return data, client, images, features


def _scrambled(client):
    """The same architecture with every weight and statistic replaced by other random values."""
    other = copy.deepcopy(client)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.1)
    return other


def _float_tensors(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def test_unsplit_knows_only_the_architecture():
    assert attacks.get("unsplit").knowledge == frozenset()
    assert attacks.attack_class("unsplit").batch_independent is False  # one copy fitted to the whole batch


def test_the_copy_shares_no_storage_and_no_value_with_the_target(setting):
    data, client, _, features = setting
    unsplit = attacks.get("unsplit", **FEW)
    target = _float_tensors(client)
    pointers = {t.untyped_storage().data_ptr() for t in target.values()}
    for module in (unsplit.copy_of(client, features.device), unsplit.steal(client, features, data.shape).client):
        mine = _float_tensors(module)
        assert mine.keys() == target.keys()
        assert not pointers & {t.untyped_storage().data_ptr() for t in mine.values()}
        assert [k for k, v in mine.items() if torch.equal(v, target[k])] == []
    assert all(torch.equal(v, _float_tensors(client)[k]) for k, v in target.items())  # the target is untouched


def test_the_result_is_the_same_whatever_the_target_weights(setting):
    """The features come from ``client``; handing UnSplit another client of the same architecture changes
    nothing, bit for bit. A white-box attack (rMLE) on the same two clients does change: the check has teeth."""
    data, client, _, features = setting
    other = _scrambled(client)
    context = AttackContext(image_shape=data.shape)
    unsplit = attacks.get("unsplit", **FEW)
    assert torch.equal(unsplit.reconstruct(client, features, context).images,
                       unsplit.reconstruct(other, features, context).images)
    rmle = attacks.get("rmle", iterations=3, dtype="float32")
    assert not torch.equal(rmle.reconstruct(client, features, context).images,
                           rmle.reconstruct(other, features, context).images)


def test_fitting_the_copy_is_what_reproduces_the_features(setting):
    """At the default budget (20 rounds) the alternation fits the held-out features to a few percent, and its
    images are closer to the truth than its grey start and than the same fit through the random copy alone
    (``model_steps=0``). Measured here: MSE 0.111 (UnSplit), 0.203 (random copy), 0.142 (grey).

    Not asserted, because it does not hold at this cut: beating the mean image of 200 training digits (MSE
    0.049; through the trained stem conv it does, below). UnSplit recovers the digits only up to what a copy
    with free weights leaves open (a filter, a colour mixing, the polarity); see the class."""
    data, client, images, features = setting
    context = AttackContext(image_shape=data.shape)
    fitted = attacks.get("unsplit").reconstruct(client, features, context)
    random_copy = attacks.get("unsplit", model_steps=0).reconstruct(client, features, context)
    assert fitted.diagnostics["residual"] < 0.1 < 0.5 < random_copy.diagnostics["residual"]

    def mse(rec):
        return float((rec.images - images).pow(2).mean())
    assert mse(fitted) < 0.75 * mse(random_copy)
    assert mse(fitted) < float((0.5 - images).pow(2).mean())
    spent = fitted.diagnostics["budget"]
    assert spent["end_to_end_iterations"] >= 20 * 10  # at least every round's Adam steps
    assert spent["end_to_end_evaluations"] >= spent["end_to_end_iterations"]


def test_through_a_trained_first_conv_it_beats_the_mean_image(small_split):
    """At the shallowest cut, ResNet-20's stem conv (``conv1``, one linear 3x3 conv, 3 -> 16 channels) of the
    trained target, the default UnSplit beats the mean image of 200 training digits on 8 held-out digits. Measured
    here: MSE 0.0137 (copy seeds 1-3: 0.015-0.019; 50 rounds: 0.005) against 0.049 for the mean image, and 0.166
    through the random copy alone. It does not hold at every shallow cut: through a random conv1 the default
    gives 0.042-0.065 over copy seeds 0-3, and after the stem's BatchNorm or ReLU, after layer1.0, or through a
    random conv+ReLU it stays at 0.10-0.51, above the mean image (trained and random targets alike)."""
    data = small_split.data
    client = split(small_split.trained.model, "conv1")[0].eval()
    images = data.x_test[:8]
    with torch.no_grad():
        features = client(images)
    context = AttackContext(image_shape=data.shape)
    fitted = attacks.get("unsplit").reconstruct(client, features, context)
    random_copy = attacks.get("unsplit", model_steps=0).reconstruct(client, features, context)

    def mse(reconstructed):
        return float((reconstructed - images).pow(2).mean())
    mean_image = mse(data.x_train[:200].mean(dim=0, keepdim=True))
    assert mse(fitted.images) < 0.5 * mean_image < mean_image < mse(random_copy.images)


def test_a_client_with_a_tensor_no_reset_covers_is_not_supported():
    class Gain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.gain

    ok, reason = attacks.get("unsplit").supports(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Gain()))
    assert not ok and "1.gain" in reason
