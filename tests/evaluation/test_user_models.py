"""The user's own models (a factory defined here, a torchvision architecture) with the user's weights, run from
YAML end to end without training; bad weights, factories and devices stop at validation naming the key."""
import json
import sqlite3

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from leakbench.evaluation.cli import main
from leakbench.evaluation.config import ConfigError, load_config
from leakbench.splitnn import datasets, devices
from leakbench.splitnn.training import accuracy


class TinyResNet(nn.Module):
    """The user's own network: BN-free blocks with functional ReLUs (PEEL finds them by structure)."""

    def __init__(self, num_classes=10, in_channels=3, width=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1)
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, 1, 1), nn.Conv2d(width, width, 3, 1, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build(num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    """The factory a config names as ``test_user_models:build``."""
    return TinyResNet(num_classes, in_channels, width)


USER = "{factory: 'test_user_models:build'}"


def _config(tmp_path, model, extra=""):
    path = tmp_path / "user.yaml"
    path.write_text(f"""name: user
dataset: {{name: digits, params: {{size: 16}}}}
model: {model}
cut: stem
defenses: [none]
attacks: [{{name: rmle, params: {{max_evaluations: 5}}}}]
evaluation: {{num_images: 2, classifier: false}}
{extra}""")
    return path


def _weights(tmp_path, model, name="w.pt"):
    torch.manual_seed(3)
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def test_a_user_factory_with_weights_runs_a_full_cell_untrained(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    model = build(10, 3, width=6)
    weights = _weights(tmp_path, model)
    config = _config(tmp_path, f"{{factory: 'test_user_models:build', params: {{width: 6}}, weights: {weights}}}")
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        status, acc, row_model = db.execute("select status, accuracy, model from cells").fetchone()
    data = datasets.get("digits", size=16)
    assert status == "done" and row_model == "test_user_models:build(width=6)"
    assert acc == pytest.approx(accuracy(model.eval(), data.x_test, data.y_test), abs=1e-6)  # its weights, as given
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").iterdir())


def test_new_weights_are_a_new_cell(tmp_path):
    weights = _weights(tmp_path, build(10, 3))
    key = lambda: load_config(_config(tmp_path, f"{{factory: 'test_user_models:build', weights: {weights}}}")  # noqa
                              ).cells()[0].key
    before = key()
    torch.save(build(10, 3).state_dict(), weights)  # other values, same names and shapes
    assert key() != before
    untrained = load_config(_config(tmp_path, "{factory: 'test_user_models:build'}")).cells()[0]
    assert "weights" not in untrained.config["model"]


def test_an_image_folder_a_torchvision_resnet18_with_weights_and_device_auto_run_end_to_end(tmp_path):
    from PIL import Image

    for c, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        for i in range(4):
            (tmp_path / "images" / f"class{c}").mkdir(parents=True, exist_ok=True)
            image = Image.new("RGB", (48, 40), tuple(v - 5 * i for v in colour))
            image.save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    weights = _weights(tmp_path, torchvision.models.resnet18(num_classes=2))
    path = tmp_path / "folder.yaml"
    root = tmp_path / "images"
    path.write_text(f"""dataset: {{name: image_folder, params: {{root: {root}, size: 32, test_fraction: 0.5}}}}
model: {{torchvision: resnet18, num_classes: 2, weights: {weights}}}
cut: layer1
defenses: [none]
attacks: [{{name: rmle, params: {{max_evaluations: 5}}}}]
evaluation: {{num_images: 2, classifier: false}}
device: auto
""")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        status, model, psnr = db.execute("select status, model, psnr from cells").fetchone()
    assert (status, model) == ("done", "torchvision:resnet18(num_classes=2)") and psnr > 0


@pytest.mark.parametrize("case, expected", [
    ("missing", "model.weights: got '.*missing.pt', expected an existing state-dict file"),
    ("not torch", "model.weights: .*expected a state dict saved by torch.save"),
    ("not a state dict", "model.weights: .*expected a state dict \\(a mapping of names to tensors\\)"),
    ("other shapes", "model.weights: .*shape of .*conv1.weight \\(6, 6, 3, 3\\) \\(the model's is \\(8, 8, 3, 3\\)\\)"),
    ("other model", "model.weights: .*missing .*unexpected"),
    ("unknown factory", "model.factory: got 'no_such_module:build', expected package.module:function"),
    ("unknown torchvision", "model.torchvision: got 'torchvision:resnet9', expected a torchvision"),
    ("two names", "model: .*expected exactly one of name"),
    ("with a training defense", "model.weights: .*no weights with a training defense \\(nopeek"),
])
def test_bad_models_and_weights_stop_at_validation_naming_the_key(tmp_path, capsys, case, expected):
    weights = tmp_path / "w.pt"
    factory = "test_user_models:build"
    extra = ""
    if case == "not torch":
        weights.write_text("hello")
    elif case == "not a state dict":
        torch.save({"epoch": 3}, weights)
    elif case == "other shapes":
        torch.save(build(10, 3, width=6).state_dict(), weights)
    elif case == "other model":
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    else:
        torch.save(build(10, 3).state_dict(), weights)
    model = {"missing": f"{{factory: {factory}, weights: {tmp_path / 'missing.pt'}}}",
             "unknown factory": "{factory: 'no_such_module:build'}",
             "unknown torchvision": "{torchvision: resnet9}",
             "two names": f"{{name: resnet20, factory: {factory}}}"}.get(case,
                                                                          f"{{factory: {factory}, weights: {weights}}}")
    if case == "with a training defense":
        model, extra = f"{{factory: {factory}, weights: {weights}}}", ""
        path = _config(tmp_path, model)
        path.write_text(path.read_text().replace("defenses: [none]", "defenses: [none, nopeek]"))
    else:
        path = _config(tmp_path, model, extra)
    assert main(["validate", str(path)]) == 2
    assert __import__("re").search(expected, capsys.readouterr().err), case


def test_the_device_is_resolved_checked_and_recorded(tmp_path, capsys):
    assert devices.resolve("cpu") == ("cpu", None)
    assert devices.resolve("auto")[0] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device: got 'tpu', expected"):
        load_config(_config(tmp_path, USER, "device: tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: got 'cuda', expected auto or cpu: no CUDA device"):
            load_config(_config(tmp_path, USER, "device: cuda"))
        assert load_config(_config(tmp_path, USER, "device: cuda"), device="cpu").device == "cpu"
        with pytest.raises(ConfigError, match="--device: got 'cuda:1'"):
            load_config(_config(tmp_path, USER), device="cuda:1")
    else:
        assert load_config(_config(tmp_path, USER, "device: cuda")).device == "cuda"
        with pytest.raises(ConfigError, match=f"--device: got 'cuda:{torch.cuda.device_count()}'"):
            load_config(_config(tmp_path, USER), device=f"cuda:{torch.cuda.device_count()}")
    config = _config(tmp_path, "{factory: 'test_user_models:build', train: {epochs: 1}}", "device: auto")
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        provenance = json.loads(db.execute("select provenance_json from runs").fetchone()[0])
    assert provenance["device"].startswith("cpu (")
