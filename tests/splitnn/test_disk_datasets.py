"""Datasets read from disk (splitnn/disk_datasets.py), on tiny fake files written in a temp dir in each format:
the pixels and labels that come back are the ones written, and a wrong root stops at validation naming the key,
the path and the files expected."""
import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from leakbench.splitnn import datasets, disk_datasets
from leakbench.splitnn.errors import ParameterError


def _idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _fashion(root, gz=True, n=(12, 6)):
    rng = np.random.default_rng(0)
    written = {}
    for split, count in zip(("train", "test"), n):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        names = disk_datasets.FASHION_FILES[split]
        _idx(root / (names[0] + (".gz" if gz else "")), images, gz)
        _idx(root / (names[1] + (".gz" if gz else "")), labels, gz)
        written[split] = images, labels
    return written


@pytest.mark.parametrize("layout", ["debian", "torchvision"])
def test_fashion_mnist_reads_the_idx_files_as_written(tmp_path, layout):
    root = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    root.mkdir(parents=True, exist_ok=True)
    written = _fashion(root, gz=layout == "debian")
    data = datasets.get("fashion_mnist", root=str(tmp_path), size=28, channels=1)
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (6, 1, 28, 28)
    torch.testing.assert_close(data.x_train[:, 0], torch.as_tensor(written["train"][0]).float() / 255)
    assert data.y_test.tolist() == written["test"][1].tolist() and data.num_classes == 10
    info = datasets.describe("fashion_mnist", root=str(tmp_path), train_images=5)
    assert (info.num_classes, info.num_images) == (10, 5 + 6)


def test_a_cap_keeps_a_seeded_subset_of_the_images_as_written(tmp_path):
    written = _fashion(tmp_path)
    data = datasets.get("fashion_mnist", root=str(tmp_path), size=28, channels=3, train_images=5, split_seed=3)
    again = datasets.get("fashion_mnist", root=str(tmp_path), size=28, channels=3, train_images=5, split_seed=3)
    assert data.x_train.shape == (5, 3, 28, 28) and torch.equal(data.x_train, again.x_train)
    kept = disk_datasets.kept_indices(12, 5, 3)
    torch.testing.assert_close(data.x_train[:, 1], torch.as_tensor(written["train"][0][kept]).float() / 255)


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "t10k-labels-idx1-ubyte.gz").unlink(), "missing: t10k-labels-idx1-ubyte[.gz]"),
    (lambda root: (root / "x").mkdir() or None, None),  # an unrelated file changes nothing
])
def test_a_missing_file_is_named(tmp_path, damage, message):
    _fashion(tmp_path)
    damage(tmp_path)
    if message is None:
        assert datasets.describe("fashion_mnist", root=str(tmp_path)).num_images == 18
        return
    with pytest.raises(ParameterError, match="root") as caught:
        datasets.describe("fashion_mnist", root=str(tmp_path))
    assert message.replace("missing:", f"missing under {tmp_path}:") in str(caught.value)


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    _fashion(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as file:
        file.write(b"<html>not found</html>")
    with pytest.raises(ParameterError, match="IDX file"):
        datasets.describe("fashion_mnist", root=str(tmp_path))


def _cifar(root, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(1)
    written = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 4))
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        written[name] = data, labels
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a: True)  # MD5s of the published files
    return written


def test_cifar10_reads_torchvisions_files(tmp_path, monkeypatch):
    written = _cifar(tmp_path, monkeypatch)
    data = datasets.get("cifar10", root=str(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    expected = torch.as_tensor(written["test_batch"][0].reshape(4, 3, 32, 32)).float() / 255
    torch.testing.assert_close(data.x_test, expected)
    assert data.y_test.tolist() == [int(v) for v in written["test_batch"][1]]
    with pytest.raises(ParameterError, match="cifar-100-python/train"):
        datasets.describe("cifar100", root=str(tmp_path))


def _png(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_by_fraction_and_by_sub_folders(tmp_path):
    for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        for i in range(4):
            _png(tmp_path / "all" / f"class{c}" / f"{i}.png", colour)
            _png(tmp_path / "split" / ("train" if i < 3 else "test") / f"class{c}" / f"{i}.png", colour)
    data = datasets.get("image_folder", root=str(tmp_path / "all"), size=16, test_fraction=0.5)
    assert data.x_train.shape == (4, 3, 16, 16) and sorted(data.y_test.tolist()) == [0, 0, 1, 1]  # stratified
    for x, y in zip(data.x_test, data.y_test):  # resized and centre-cropped: the colour survives
        assert torch.allclose(x[0 if y == 0 else 2], torch.ones(16, 16)) and float(x[1].max()) == 0
    split = datasets.get("image_folder", root=str(tmp_path / "split"), size=8, channels=1)
    assert (len(split.x_train), len(split.x_test), split.num_classes, split.in_channels) == (6, 2, 2, 1)
    torch.testing.assert_close(split.x_test[split.y_test == 0], torch.full((1, 1, 8, 8), 0.299))  # luma of red
    info = datasets.describe("image_folder", root=str(tmp_path / "split"), test_images=1)
    assert (info.num_classes, info.num_images) == (2, 7)


def test_image_folder_errors_name_the_root(tmp_path):
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "odd" / "train" / "a" / "0.png", (0, 0, 0))
    _png(tmp_path / "odd" / "test" / "b" / "0.png", (0, 0, 0))
    for root, message in [(tmp_path / "nope", "an existing folder"), (tmp_path / "empty", "one sub-folder"),
                          (tmp_path / "odd", "the same classes")]:
        with pytest.raises(ParameterError, match=message) as caught:
            datasets.describe("image_folder", root=str(root))
        assert caught.value.key == "root"


def test_celeba_gives_zero_based_identities(tmp_path, monkeypatch):
    from torchvision.datasets import CelebA

    base = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    for i, name in enumerate(names):
        _png(base / "img_align_celeba" / name, (40 * i, 0, 0), size=(178, 218))
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {[0, 0, 0, 1, 2, 2][i]}\n"
                                                          for i, n in enumerate(names)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {[5, 7, 5, 1, 7, 5][i]}\n" for i, n in enumerate(names)))
    header = "6\n" + " ".join(f"a{k}" for k in range(40)) + "\n"
    (base / "list_attr_celeba.txt").write_text(header + "".join(f"{n} " + " ".join(["1"] * 40) + "\n" for n in names))
    (base / "list_bbox_celeba.txt").write_text("6\nimage_id x_1 y_1 width height\n" +
                                               "".join(f"{n} 0 0 1 1\n" for n in names))
    (base / "list_landmarks_align_celeba.txt").write_text("6\n" + " ".join(f"l{k}" for k in range(10)) + "\n" +
                                                          "".join(f"{n} " + " ".join(["1"] * 10) + "\n" for n in names))
    monkeypatch.setattr(CelebA, "_check_integrity", lambda self: True)  # the MD5s are of the published files
    info = datasets.describe("celeba", root=str(tmp_path))
    assert (info.num_classes, info.num_images) == (10177, 5)
    data = datasets.get("celeba", root=str(tmp_path), size=16)
    assert data.x_train.shape == (3, 3, 16, 16) and data.y_train.tolist() == [4, 6, 4]
    assert data.y_test.tolist() == [6, 4]
    (base / "identity_CelebA.txt").unlink()
    with pytest.raises(ParameterError, match="missing under .*: celeba/identity_CelebA.txt"):
        datasets.describe("celeba", root=str(tmp_path))


def test_lfw_people_reads_a_data_home_offline(tmp_path):
    home = tmp_path / "lfw_home"
    for person, colour in [("Ada_Lovelace", (200, 200, 200)), ("Alan_Turing", (50, 50, 50)), ("Solo", (0, 0, 0))]:
        for i in range(4 if person != "Solo" else 1):
            _png(home / "lfw_funneled" / person / f"{person}_{i:04d}.jpg", colour, size=(250, 250))
    for name in ("pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        (home / name).write_text("1\n")
    info = datasets.describe("lfw_people", root=str(tmp_path), min_faces_per_person=2)
    assert (info.num_classes, info.num_images) == (2, 8)
    data = datasets.get("lfw_people", root=str(tmp_path), size=16, min_faces_per_person=2, test_fraction=0.5)
    assert data.x_train.shape == (4, 3, 16, 16) and sorted(data.y_test.tolist()) == [0, 0, 1, 1]
    grey = data.x_test[data.y_test == 0]  # Ada's light grey, read as written (JPEG within a level or two)
    assert torch.allclose(grey, torch.full_like(grey, 200 / 255), atol=3 / 255)
    with pytest.raises(ParameterError, match="min_faces_per_person"):
        datasets.describe("lfw_people", root=str(tmp_path), min_faces_per_person=5)
