"""Images decoded on demand (splitnn/lazy_images.py) on a temp folder of generated PNGs: a lazy image folder gives
the eager one's pixels for every kind of index, trains the same weights, keeps the cell keys of the eager default,
and a whole cell runs on it without ever decoding the training set at once."""
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from leakbench.evaluation import attack_context
from leakbench.evaluation.cli import main
from leakbench.splitnn import datasets, lazy_images
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.lazy_images import LazyImages
from leakbench.splitnn.training import fit


def _folder(root, per_class, size=(14, 11), classes=2):
    """``per_class`` random-noise PNGs per class (not square: resize and centre-crop both act)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("channels", [3, 1])
def test_a_lazy_folder_gives_the_eager_pixels_for_ints_slices_and_index_tensors(tmp_path, channels):
    root = str(_folder(tmp_path / "images", 12))
    eager = datasets.get("image_folder", root=root, size=8, channels=channels, lazy=False)
    lazy = datasets.get("image_folder", root=root, size=8, channels=channels, lazy=True)
    assert isinstance(eager.x_train, torch.Tensor) and isinstance(lazy.x_train, LazyImages)
    assert lazy.x_train.shape == eager.x_train.shape == (18, channels, 8, 8) and len(lazy.x_test) == 6
    assert lazy.x_train.dtype == eager.x_train.dtype and lazy.shape == eager.shape
    assert torch.equal(lazy.y_train, eager.y_train) and torch.equal(lazy.y_test, eager.y_test)
    for key in [0, 5, -1, np.int64(3), torch.tensor(4), slice(None), slice(2, 11, 3), slice(-4, None), [7, 0, 7],
                np.array([1, 2]), torch.tensor([17, 3]), eager.y_train == 1, []]:
        assert torch.equal(lazy.x_train[key], eager.x_train[key]), key
    assert torch.equal(torch.stack(list(lazy.x_test)), eager.x_test)  # iterating stops at the end
    assert torch.equal(lazy.x_train.subset([4, 2])[1], eager.x_train[2])
    with pytest.raises(IndexError):
        lazy.x_train[18]
    with pytest.raises(IndexError):
        lazy.x_train[torch.tensor([0.5])]


def test_lazy_enters_the_parameters_only_when_given_and_auto_switches_above_the_threshold(tmp_path, monkeypatch):
    root = str(_folder(tmp_path / "images", 8))
    plain = datasets.describe("image_folder", root=root)
    assert "lazy" not in plain.params and datasets.describe("image_folder", root=root, lazy="auto") == plain
    assert datasets.describe("image_folder", root=root, lazy=True).params["lazy"] is True
    assert "lazy" not in datasets.get("image_folder", root=root, size=8).params  # the judge's checkpoint key
    with pytest.raises(ParameterError, match="true, false or 'auto'") as caught:
        datasets.describe("image_folder", root=root, lazy="yes")
    assert caught.value.key == "lazy"
    monkeypatch.setattr(lazy_images, "LAZY_ABOVE", 5)  # 12 train images are lazy, 4 test images are not
    data = datasets.get("image_folder", root=root, size=8)
    assert isinstance(data.x_train, LazyImages) and isinstance(data.x_test, torch.Tensor)


def test_training_on_lazy_images_gives_the_weights_of_training_on_the_tensor(tmp_path):
    root = str(_folder(tmp_path / "images", 10))
    eager, lazy = (datasets.get("image_folder", root=root, size=8, lazy=flag) for flag in (False, True))
    weights = []
    for data in (eager, lazy):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        fit(model, data.x_train, data.y_train, epochs=2, lr=0.1, batch_size=4, weight_decay=5e-4, seed=1,
            progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_cell_on_a_lazy_folder_runs_and_never_decodes_the_training_set_at_once(tmp_path, monkeypatch):
    """300 training images: every decode request (training batches, accuracy's, the pruning fine-tune's, the
    capped auxiliary data) is at most a batch of 256, never the 300."""
    root = _folder(tmp_path / "images", 200, size=(10, 10))
    requests: list[int] = []
    load = LazyImages._load
    monkeypatch.setattr(LazyImages, "_load", lambda self, source: requests.append(len(source)) or load(self, source))
    monkeypatch.setattr(attack_context, "AUXILIARY_LAZY_CAP", 40)
    config = tmp_path / "lazy.yaml"
    config.write_text(f"""name: lazy
seed: 0
dataset: {{name: image_folder, params: {{root: {root}, size: 16, lazy: true}}}}
model: resnet20
train: {{epochs: 1, batch_size: 64}}
cut: layer1
defenses: [{{name: pruning, params: {{ratio: 0.25, samples: 16, finetune_server: 1}}}}]
attacks: [{{name: inverse_net, params: {{epochs: 1, hidden: 8}}}}]
evaluation: {{num_images: 2, classifier: false}}
""")
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        status, psnr = db.execute("select status, psnr from cells").fetchone()
    assert status == "done" and psnr > 0
    assert requests and max(requests) <= lazy_images.DECODE_BATCH < 300
    assert 40 in requests  # the auxiliary data: the cap, decoded once
