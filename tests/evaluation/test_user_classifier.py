"""The user's own evaluation classifier (a factory defined here, with the user's weights) scores a full cell
without being trained, names itself in the row and in the judge's key; bad judges stop at validation naming the
key. And the user's factory module enters the row fingerprint: editing it makes its rows stale."""
import json
import re
import sqlite3
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leakbench import attacks, defenses
from leakbench.evaluation.cli import main
from leakbench.evaluation.config import load_config
from leakbench.evaluation.eval_classifier import weights_digest
from leakbench.evaluation.evaluators import Evaluators
from leakbench.evaluation.store import ROW_MODULES, row_fingerprint
from leakbench.splitnn import datasets, fingerprint
from leakbench.splitnn.training import accuracy, config_hash


class TinyNet(nn.Module):
    """A small classifier: the target and the judge (the input of ``head`` is the judge's embedding)."""

    def __init__(self, num_classes=10, in_channels=3, width=4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(F.relu(self.stem(x)), 1).flatten(1))


def build(num_classes: int, in_channels: int, width: int = 4) -> nn.Module:
    """The factory a config names as ``test_user_classifier:build``."""
    return TinyNet(num_classes, in_channels, width)


def _save(tmp_path, model, name):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def _config(tmp_path, classifier):
    target = _save(tmp_path, build(10, 3), "target.pt")
    path = tmp_path / "judged.yaml"
    path.write_text(f"""name: judged
dataset: {{name: digits, params: {{size: 16}}}}
model: {{factory: 'test_user_classifier:build', weights: {target}}}
cut: stem
defenses: [none]
attacks: [{{name: rmle, params: {{max_evaluations: 5}}}}]
evaluation: {{num_images: 2, classifier: {classifier}}}
""")
    return path


def test_the_users_judge_scores_a_full_cell_untrained_and_the_row_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    judge = build(10, 3, width=6)
    weights = _save(tmp_path, judge, "judge.pt")
    config = _config(tmp_path, f"{{factory: 'test_user_classifier:build', params: {{width: 6}}, weights: {weights}}}")
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        status, evaluator, top1, notes = db.execute(
            "select status, evaluator, attack_top1, diagnostics_json from cells").fetchone()
    assert status == "done" and top1 is not None
    assert evaluator == f"test_user_classifier:build(width=6) weights {weights_digest(judge)}"
    note = json.loads(notes)["evaluation"]
    data = datasets.get("digits", size=16)
    assert note["evaluator_test_accuracy"] == pytest.approx(accuracy(judge.eval(), data.x_test, data.y_test))
    assert note["classifier"]["weights_file"]["file"] == str(weights) and note["classifier"]["seed"] is None
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").iterdir())


def test_the_judges_weights_identify_it_and_the_fixed_judge_keeps_its_key(tmp_path):
    first = _save(tmp_path, build(10, 3), "a.pt")
    second = _save(tmp_path, build(10, 3), "b.pt")  # other values, same names and shapes
    cell = lambda c: load_config(_config(tmp_path, c)).cells()[0]  # noqa: E731
    a, b = (cell(f"{{factory: 'test_user_classifier:build', weights: {w}}}") for w in (first, second))
    fixed = cell("true")
    assert a["evaluation"]["classifier"]["weights"]["sha256"] != b["evaluation"]["classifier"]["weights"]["sha256"]
    assert Evaluators.classifier_key(a) != Evaluators.classifier_key(b) and a.key != b.key
    assert Evaluators.classifier_key(fixed) == config_hash({"dataset": fixed["dataset"]})  # as before user judges
    assert fixed["evaluation"]["classifier"] is True


@pytest.mark.parametrize("classifier, expected", [
    ("{factory: 'test_user_classifier:build'}", "evaluation.classifier.weights: .*state-dict file"),
    ("{factory: 'no_such_module:build', weights: W}", "evaluation.classifier.factory: got 'no_such_module:build'"),
    ("{factory: 'test_user_classifier:build', num_classes: 7, weights: W}",
     "evaluation.classifier.num_classes: got 7, expected the dataset's 10 classes"),
    ("{factory: 'test_user_classifier:build', params: {width: 5}, weights: W}",
     "evaluation.classifier.weights: .*shape of head.weight"),
    ("{factory: 'test_user_classifier:build', weights: W, train: {epochs: 1}}", "evaluation.classifier.train: "),
    ("{factory: 'test_user_classifier:build', weights: W, colour: red}", "evaluation.classifier.colour: .*no such"),
    ("{torchvision: resnet18, num_classes: 10, weights: W}", "evaluation.classifier.weights: .*missing"),
    ("maybe", "evaluation.classifier: got 'maybe', expected true, false, or the user's classifier"),
    ("{factory: 'torch.nn:Identity', weights: W}", "evaluation.classifier.factory: .*a last nn.Linear"),
])
def test_bad_judges_stop_at_validation_naming_the_key(tmp_path, capsys, classifier, expected):
    weights = _save(tmp_path, build(10, 3), "judge.pt")
    path = _config(tmp_path, classifier.replace("weights: W", f"weights: {weights}"))
    assert main(["validate", str(path)]) == 2
    assert re.search(expected, capsys.readouterr().err), classifier


USER_MODULE = '''from torch import nn


def build(num_classes=10, in_channels=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 16 * 16, num_classes))
'''


def test_the_users_factory_module_enters_the_row_fingerprint_without_being_imported(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "fp_user_model.py"
    module.write_text(USER_MODULE)
    base = {"attack": {"name": "rmle", "params": {}}, "defense": {"name": "none", "params": {}}}
    judge = {"name": "fp_user_model:build", "params": {}, "weights": {"file": "j.pt", "sha256": "0" * 16}}
    cells = {"model": {**base, "model": {"name": "fp_user_model:build", "params": {}}, "evaluation": {}},
             "judge": {**base, "model": {"name": "resnet20", "params": {}}, "evaluation": {"classifier": judge}},
             "zoo": {**base, "model": {"name": "resnet20", "params": {}}, "evaluation": {"classifier": True}},
             "torchvision": {**base, "model": {"name": "torchvision:resnet18", "params": {}}}}
    fingerprint.clear_cache()
    before = {k: row_fingerprint(c) for k, c in cells.items()}
    assert "fp_user_model" not in sys.modules
    plain = fingerprint.code_fingerprint(attacks.attack_class("rmle").__module__,
                                         defenses.defense_class("none").__module__, *ROW_MODULES)
    assert before["zoo"] == before["torchvision"] == plain != before["model"]
    module.write_text(USER_MODULE + "\n# tuned\n")
    fingerprint.clear_cache()
    after = {k: row_fingerprint(c) for k, c in cells.items()}
    assert after["model"] != before["model"] and after["judge"] != before["judge"]
    assert after["zoo"] == before["zoo"] and after["torchvision"] == before["torchvision"]
