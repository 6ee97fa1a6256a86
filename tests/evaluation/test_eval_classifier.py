"""The evaluation classifier (the judge), LPIPS from local weights, and both in the matrix."""
import json

import pytest
import torch
import torchvision

from harness import BASE_MAPPING, TINY_CONFIG, swap, without_judge, write_config
from leakbench.evaluation import Matrix, ResultStore, load_config
from leakbench.evaluation.config import ConfigError, ExperimentConfig
from leakbench.evaluation.eval_classifier import (EVALUATION_RECIPE, EVALUATION_SEED, get_evaluation_classifier,
                                                  weights_digest)
from leakbench.evaluation.evaluators import Evaluators
from leakbench.evaluation.perceptual import LPIPS, LPIPS_UNAVAILABLE
from leakbench.splitnn import datasets
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.training import TrainConfig, train


@pytest.fixture(scope="module")
def digits16():
    return datasets.get("digits", size=16)


@pytest.fixture(scope="module")
def judge(digits16, tmp_path_factory):
    cache = tmp_path_factory.mktemp("judge_cache")
    return get_evaluation_classifier(digits16, str(cache), train_params={"epochs": 3, "batch_size": 64})


def test_recognises_true_images_and_not_noise(judge, digits16):
    m = judge.classifier_metrics(digits16.x_test, digits16.y_test)
    assert sum(m["attack_top1"]) / len(digits16.y_test) > 0.7  # chance is 0.1
    assert all(t5 >= t1 for t1, t5 in zip(m["attack_top1"], m["attack_top5"]))
    noise = torch.rand(300, *digits16.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(2))
    top1 = judge.classifier_metrics(noise, labels)["attack_top1"]
    assert sum(top1) / 300 < 0.25
    # noise lies farther from its claimed class's training images than true test images from theirs
    knn_noise = judge.classifier_metrics(noise, labels)["knn_distance"]
    assert sum(knn_noise) / 300 > 2 * sum(m["knn_distance"]) / len(m["knn_distance"])


def test_knn_distance_of_a_training_image_is_zero(judge, digits16):
    m = judge.classifier_metrics(digits16.x_train[:5], digits16.y_train[:5])
    assert m["knn_distance"] == pytest.approx([0.0] * 5, abs=1e-6)
    assert judge.embed(digits16.x_train[:5]).shape == (5, 64)  # ResNet-32's penultimate width
    assert judge.logits(digits16.x_train[:5]).shape == (5, 10)


def test_is_trained_once_then_loaded_from_the_checkpoint_cache(digits16, tmp_path):
    params = {"epochs": 1, "batch_size": 128}
    first = get_evaluation_classifier(digits16, str(tmp_path), train_params=params)
    checkpoints = list((tmp_path / "models").glob("*.pt"))
    second = get_evaluation_classifier(digits16, str(tmp_path), train_params=params)
    assert len(checkpoints) == 1 and list((tmp_path / "models").glob("*.pt")) == checkpoints
    assert checkpoints[0].stem == first.checkpoint == second.checkpoint
    x = digits16.x_test[:4]
    assert torch.equal(first.logits(x), second.logits(x)) and first.identity == second.identity


def test_rejects_labels_out_of_range(judge, digits16):
    with pytest.raises(ValueError, match="labels"):
        judge.classifier_metrics(digits16.x_test[:2], torch.tensor([0, 10]))


def test_matrix_stores_classifier_metrics_and_why_lpips_is_missing(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        Matrix(load_config(write_config(tmp_path)), progress=False).run(store)
        images, cells = store.images(), store.cells()
    assert {"attack_top1", "attack_top5", "knn_distance"} <= set(images.columns) and "lpips" not in images
    assert images.attack_top1.isin([0.0, 1.0]).all() and (images.knn_distance >= 0).all()
    # summarised like every metric (its bounds' coverage is evaluation.statistics' to test: NaN below 12 images)
    assert cells.attack_top1.between(0, 1).all() and "attack_top1_ci_low" in cells
    notes = [json.loads(d)["evaluation"] for d in cells.diagnostics_json]
    assert all(n["unavailable"]["lpips"] == LPIPS_UNAVAILABLE for n in notes)
    assert {n["evaluator"] for n in notes} == {notes[0]["evaluator"]}  # every row names the same judge
    assert notes[0]["evaluator"].startswith(f"resnet32 seed {EVALUATION_SEED} weights ")
    assert 0.9 < notes[0]["evaluator_test_accuracy"] <= 1 and notes[0]["classifier"]["model"] == "resnet32"


def test_classifier_metrics_can_be_turned_off(tmp_path):
    config = load_config(write_config(tmp_path, without_judge()))
    with ResultStore(tmp_path / "r.sqlite") as store:
        Matrix(config, progress=False).run(store)
        assert "attack_top1" not in store.images().columns


@pytest.mark.parametrize("evaluation, key", [
    ("{classifier: yes please}", "evaluation.classifier"),
    ("{lpips_weights: /no/such/file.pth}", "evaluation.lpips_weights"),
    ("{lpips_weights: 3}", "evaluation.lpips_weights"),
    ("{lpips_net: resnet}", "evaluation.lpips_net"),
    ("{lpip_weights: x}", "evaluation.lpip_weights"),
])
def test_bad_evaluation_keys_are_named(tmp_path, evaluation, key):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, swap(TINY_CONFIG, "{num_images: 2}", evaluation)))
    assert info.value.key == key


@pytest.fixture(scope="module")
def squeeze_weights(tmp_path_factory):
    """A torchvision SqueezeNet 1.1 state dict (random weights: the real ones cannot be downloaded here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


def test_lpips_reads_the_local_backbone_weights(squeeze_weights):
    metric = LPIPS(squeeze_weights, "squeeze")
    saved = torch.load(squeeze_weights, weights_only=True)
    first_conv = dict(metric.net.net.slices[0].named_children())["0"]  # torchvision features[0]
    assert torch.equal(first_conv.weight, saved["features.0.weight"])
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metric(x, x) == pytest.approx([0.0] * 3, abs=1e-6)
    far = metric(1 - x, x)
    near = metric((x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1), x)
    assert all(n < f for n, f in zip(near, far)) and min(near) > 0
    assert len(metric(x[:, :1], x[:, :1])) == 3  # grey images are repeated to RGB


def test_lpips_rejects_a_state_dict_of_another_backbone(squeeze_weights):
    with pytest.raises(ParameterError, match="alexnet"):
        LPIPS(squeeze_weights, "alex")


def test_lpips_in_the_matrix_from_a_config_path(tmp_path, squeeze_weights):
    text = swap(TINY_CONFIG, "{num_images: 2}", f"{{num_images: 2, lpips_weights: {squeeze_weights}, "
                                               "lpips_net: squeeze, classifier: false}")
    text = swap(text, "{name: digits, params: {size: 16}}", "digits")  # LPIPS' backbone needs more than 16x16
    with ResultStore(tmp_path / "r.sqlite") as store:
        Matrix(load_config(write_config(tmp_path, text)), progress=False).run(store)
        images = store.images()
    assert images.lpips.notna().all() and (images.lpips > 0).all()


def test_one_judge_per_dataset_whatever_the_target_and_its_recipe():
    # factors.yaml's kind of table: other architectures, an untrained target, another learning rate
    cells = ExperimentConfig({**BASE_MAPPING, "model": [
        "resnet20", "resnet32", {"name": "resnet20", "train": {"epochs": 0}},
        {"name": "resnet20", "params": {"norm": "none"}, "train": {"lr": 0.01, "epochs": 5}}]}).cells()
    assert len({c.train_config().key() for c in cells}) == 4  # four targets ...
    assert len({Evaluators.classifier_key(c) for c in cells}) == 1  # ... one judge
    other = ExperimentConfig({**BASE_MAPPING, "model": "resnet20",
                                      "dataset": {"name": "digits", "params": {"size": 24}}}).cells()[0]
    assert Evaluators.classifier_key(other) != Evaluators.classifier_key(cells[0])  # judged per dataset
    # the judge is built once and names itself identically in every row of the table
    data = datasets.get(cells[0]["dataset"]["name"], **cells[0]["dataset"]["params"])
    evaluators = Evaluators()  # the session's cache: the real judge of 16x16 digits, trained once
    judges = [evaluators.classifier(c, data) for c in cells]
    assert all(j is judges[0] for j in judges)
    images = data.x_test[:3]
    notes = [evaluators.metrics(c, data, images, images)[1] for c in cells]
    assert {n["evaluator"] for n in notes} == {judges[0].identity}
    # and it is ResNet-32, seed 1000, trained with the fixed recipe, not with any cell's
    fixed = train(TrainConfig("resnet32", data.name, dataset_params=dict(data.params), seed=EVALUATION_SEED,
                              **EVALUATION_RECIPE), data=data, progress=False)
    assert fixed.from_cache and weights_digest(fixed.model) == judges[0].weights
