import torch

from leakbench.splitnn import TrainConfig, datasets, train


def test_digits_dataset_is_fixed_stratified_and_in_range():
    data = datasets.get("digits")
    assert data.x_train.shape[1:] == (3, 32, 32)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert len(data.x_train) + len(data.x_test) == 1797
    again = datasets.get("digits")
    assert torch.equal(data.y_test, again.y_test)
    # stratified: every class is in the test set in about the same share as overall
    counts = torch.bincount(data.y_test, minlength=10).float() / len(data.y_test)
    assert float(counts.min()) > 0.08 and float(counts.max()) < 0.12


def test_lfw_faces_has_faces_and_non_faces():
    data = datasets.get("lfw_faces", size=32)
    assert data.num_classes == 2 and data.x_test.shape[1:] == (3, 32, 32)
    assert set(data.y_train.tolist()) == {0, 1}


def test_portraits_are_two_real_faces_tested_against_a_model_trained_on_lfw():
    data = datasets.get("portraits", size=64)
    assert data.x_test.shape == (2, 3, 64, 64) and data.y_test.tolist() == [1, 1]
    assert data.x_train.shape == (200, 3, 64, 64) and data.num_classes == 2
    assert 0.0 <= float(data.x_test.min()) and float(data.x_test.max()) <= 1.0
    assert float(data.x_test[:, 0].mean()) != float(data.x_test[:, 2].mean())  # colour, not grey
    grey = datasets.get("portraits", size=32, channels=1)
    assert grey.x_test.shape == (2, 1, 32, 32)


def test_checkpoint_cache_is_reused(tmp_path):
    config = TrainConfig("resnet20", "digits", epochs=1, batch_size=128)
    first = train(config, tmp_path, progress=False)
    assert not first.from_cache and first.path.exists()
    second = train(config, tmp_path, progress=False)
    assert second.from_cache and second.path == first.path
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.test_accuracy == first.test_accuracy
    # a different training config is a different checkpoint
    assert TrainConfig("resnet20", "digits", epochs=2, batch_size=128).key() != config.key()
