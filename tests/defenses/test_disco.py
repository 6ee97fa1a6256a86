"""DISCO (defenses/disco.py): per sample it removes exactly floor(ratio * C) channels, chosen by its pruning network,
and keeps more accuracy through the frozen server than removing as many channels at random or by magnitude;
adaptive PEEL reads its mask off the released zeros; train_server trains a copy of the server, never the original."""
import pytest
import torch

from leakbench import attacks, defenses
from leakbench.attacks.base import PublicDefense
from leakbench.splitnn import SplitModel
from leakbench.splitnn.training import accuracy


@pytest.fixture(scope="module")
def disco(small_split):
    defense = defenses.get("disco", ratio=0.5, samples=512, epochs=3)
    defense.fit(small_split.client, small_split.server, small_split.data.x_train, small_split.data.y_train)
    return defense


def _accuracy(split, defense, server=None) -> float:
    return accuracy(SplitModel(split.client, server or split.server, defense), split.data.x_test, split.data.y_test)


def test_it_removes_exactly_ratio_of_the_channels_of_each_sample(small_split, disco):
    with torch.no_grad():
        features = small_split.client(small_split.data.x_test[:64])
    released = disco(features)
    mask = disco.mask(features)
    assert torch.equal((mask == 0).sum(dim=1), torch.full((64,), 8))  # 8 of 16 channels, in every sample
    assert torch.equal(released, features * mask[:, :, None, None])  # the kept channels pass as computed
    assert torch.equal(disco.reseeded()(features), released)  # deterministic: the fitted network, no fresh draws


def test_it_keeps_more_accuracy_than_random_or_magnitude_pruning_of_as_many_channels(small_split, disco):
    fitted = {}
    for score in ("random", "magnitude"):
        pruning = defenses.get("pruning", ratio=0.5, score=score)
        pruning.fit(small_split.client, small_split.server, small_split.data.x_train, small_split.data.y_train)
        fitted[score] = _accuracy(small_split, pruning)
    learned = _accuracy(small_split, disco)
    assert learned > max(fitted.values()) + 0.05, (learned, fitted)  # measured 0.92 vs 0.73 and 0.79 (0.98 undefended)


def test_adaptive_peel_reads_the_mask_off_the_released_zeros(small_split, disco):
    with torch.no_grad():
        features = small_split.client(small_split.data.x_test[:4])
    released = disco(features)
    reading = attacks.peel.read_defense(PublicDefense.of(disco), released)
    assert reading.kind == "masked"
    sent = disco.mask(features).bool()[:, :, None, None]
    alive = features.flatten(2).ne(0).any(dim=2)[:, :, None, None]  # a ReLU channel may be zero by itself
    # observed exactly where a channel is sent (and not zero by itself): every removed channel is unobserved
    assert torch.equal(reading.mask, (sent & alive).expand_as(features))


def test_train_server_tunes_a_copy_and_ratio_zero_fits_nothing(small_split):
    before = {k: v.clone() for k, v in small_split.server.state_dict().items()}
    tuned = defenses.get("disco", ratio=0.5, samples=64, epochs=1, train_server=True)
    server = tuned.fit(small_split.client, small_split.server, small_split.data.x_train, small_split.data.y_train)
    assert server is not small_split.server
    assert all(torch.equal(before[k], v) for k, v in small_split.server.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in server.state_dict().items())
    zero = defenses.get("disco", ratio=0.0)
    assert zero.fit(small_split.client, small_split.server, small_split.data.x_train[:8],
                    small_split.data.y_train[:8]) is small_split.server and zero.scorer is None
