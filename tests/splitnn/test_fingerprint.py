"""Code fingerprints: which edits change which artefact's fingerprint, and that checkpoints and attack caches of
other code are never loaded."""
import shutil

import pytest
import torch
from torch import nn

from leakbench import defenses
from leakbench.attacks.cache import cached_module
from leakbench.splitnn import TrainConfig, datasets, fingerprint, train
from leakbench.splitnn.fingerprint import ROOT, clear_cache, code_fingerprint, sources

#: A tiny two-package project: ``pa``'s __init__ is a registry importing every plug-in.
MINI = {
    "pa/__init__.py": "from pa import plug1, plug2  # register\nfrom pa.core import Thing\n",
    "pa/core.py": "from pb.util import helper\n\nclass Thing:\n    pass\n",
    "pa/plug1.py": "from pa import Thing\n",  # a name the __init__ takes from pa.core
    "pa/plug2.py": "from . import other\n",
    "pa/other.py": "import pb\nVALUE = 1\n",
    "pb/__init__.py": "",
    "pb/util.py": "import numpy\n\ndef helper():\n    return 1\n",
}
VERSIONS = {"torch": "1.0"}


def _mini(root):
    for name, text in MINI.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _fp(root, module, versions=VERSIONS):
    return fingerprint.fingerprint([module], root=root, packages=("pa", "pb"), versions=versions)


def _edit(path):
    path.write_text(path.read_text() + "\n# edited\n")


@pytest.mark.parametrize("edited, changes, keeps", [
    ("pb/util.py", ["pa.plug1", "pa.core"], ["pa.plug2", "pa.other"]),  # plug1 -> pa.Thing -> pa.core -> pb.util
    ("pa/other.py", ["pa.plug2"], ["pa.plug1", "pa.core"]),  # a relative import
    ("pa/plug2.py", ["pa.plug2"], ["pa.plug1", "pa.other"]),  # the registry's own imports are not followed
    ("pa/__init__.py", ["pa.plug1", "pa.plug2", "pa.core"], []),  # every module of the package runs it
    ("pb/__init__.py", ["pa.other", "pa.plug1"], []),  # `import pb`, and importing pb.util runs it
])
def test_an_edit_changes_the_modules_that_import_it_and_no_others(tmp_path, edited, changes, keeps):
    root = _mini(tmp_path)
    before = {m: _fp(root, m) for m in changes + keeps}
    _edit(root / edited)
    for module in changes:
        assert _fp(root, module) != before[module], module
    for module in keeps:
        assert _fp(root, module) == before[module], module


def test_the_walk_follows_names_through_package_inits_but_not_their_imports(tmp_path):
    found = sources(["pa.plug1"], _mini(tmp_path), ("pa", "pb"))
    assert set(found) == {"pa", "pa.plug1", "pa.core", "pb", "pb.util"}  # not pa.plug2, pa.other, numpy
    assert found["pb.util"] == MINI["pb/util.py"]


def test_versions_enter_the_hash_and_paths_do_not(tmp_path):
    root = _mini(tmp_path / "one")
    assert _fp(root, "pa.plug1") != _fp(root, "pa.plug1", {"torch": "2.0"})
    assert _fp(root, "pa.plug1") != _fp(root, "pa.plug1", {"torch": "1.0", "piq": "0.8"})
    assert _fp(_mini(tmp_path / "two"), "pa.plug1") == _fp(root, "pa.plug1")  # a copy hashes the same


def test_code_fingerprint_uses_the_installed_versions(monkeypatch):
    before = code_fingerprint("leakbench.attacks.rmle")
    assert before == fingerprint.fingerprint(["leakbench.attacks.rmle"]) and len(before) == 16
    fingerprint.clear_cache()
    monkeypatch.setattr(fingerprint, "installed_versions", lambda: {"torch": "0"})
    try:
        assert code_fingerprint("leakbench.attacks.rmle") != before
    finally:
        monkeypatch.undo()
        fingerprint.clear_cache()
    assert code_fingerprint("leakbench.attacks.rmle") == before


def _project_copy(tmp_path):
    for package in (*fingerprint.PROJECT, fingerprint.NAMESPACE):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_editing_rmle_changes_the_attacks_that_use_it_and_not_the_others(tmp_path):
    root = _project_copy(tmp_path)
    modules = [f"leakbench.{m}" for m in ("attacks.rmle", "attacks.shadow", "attacks.inverse_net", "defenses.noise",
                                          "splitnn.training")]
    before = {m: fingerprint.fingerprint([m], root=root) for m in modules}
    assert before == {m: code_fingerprint(m) for m in modules}  # the copy hashes like the installed tree
    _edit(root / "attacks" / "rmle.py")
    changed = {m for m in modules if fingerprint.fingerprint([m], root=root) != before[m]}
    # shadow inverts with rMLE; the others do not use it
    assert changed == {"leakbench.attacks.rmle", "leakbench.attacks.shadow"}


def test_a_checkpoint_of_other_training_code_is_not_loaded(tmp_path, monkeypatch):
    data = datasets.get("digits", size=8)
    config = TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=0)
    first = train(config, tmp_path, data=data, progress=False)
    assert train(config, tmp_path, data=data, progress=False).from_cache
    assert first.path.name == f"{config.key()}-{config.checkpoint_fingerprint()}.pt"
    assert '"code_fingerprint"' in first.path.with_suffix(".json").read_text()
    monkeypatch.setattr("leakbench.splitnn.training.code_fingerprint", lambda *modules: "other-code")
    again = train(config, tmp_path, data=data, progress=False)
    assert not again.from_cache and again.path != first.path
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        [first.path.name, first.path.with_suffix(".json").name, again.path.name, again.path.with_suffix(".json").name])


def test_a_training_defense_module_enters_the_checkpoint_fingerprint(monkeypatch):
    config = TrainConfig("resnet20", "digits", defense={"name": "nopeek", "params": {}}, cut="layer1")
    seen = []
    monkeypatch.setattr("leakbench.splitnn.training.code_fingerprint", lambda *modules: seen.append(modules) or "x")
    config.checkpoint_fingerprint(defenses.hooks_for(config))
    assert seen == [("leakbench.splitnn.training", "leakbench.defenses.nopeek")]


def test_a_user_factory_module_enters_the_checkpoint_fingerprint(tmp_path, monkeypatch):
    """Editing the user's model code retrains the model instead of reloading the old checkpoint."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "user_net_for_checkpoints.py"
    module.write_text("def build(num_classes=10):\n    raise NotImplementedError\n")
    config = TrainConfig("user_net_for_checkpoints:build", "digits")
    before = config.checkpoint_fingerprint()
    assert before != TrainConfig("resnet20", "digits").checkpoint_fingerprint()
    module.write_text("def build(num_classes=10):\n    raise NotImplementedError  # edited\n")
    clear_cache()
    assert config.checkpoint_fingerprint() != before


def test_an_attack_cache_of_other_code_is_not_loaded(tmp_path, monkeypatch):
    trained = []

    def fit(module):
        trained.append(1)
        with torch.no_grad():
            module.weight.fill_(len(trained))

    key = {"model": "m", "cut": "layer1"}
    module, hit = cached_module(nn.Linear(2, 2), "inverse_net", key, tmp_path, fit)
    assert not hit
    module, hit = cached_module(nn.Linear(2, 2), "inverse_net", key, tmp_path, fit)
    assert hit and module.weight.eq(1).all() and len(trained) == 1
    monkeypatch.setattr("leakbench.attacks.cache.class_fingerprint", lambda cls: "other-code")
    module, hit = cached_module(nn.Linear(2, 2), "inverse_net", key, tmp_path, fit)
    assert not hit and module.weight.eq(2).all()
    assert len(list((tmp_path / "attacks").glob("inverse_net-*.pt"))) == 2
    assert not list((tmp_path / "attacks").glob("*.tmp"))  # no temporary left behind
    with pytest.raises(ValueError, match="fingerprint="):
        cached_module(nn.Linear(2, 2), "not_an_attack", key, tmp_path, fit)


def test_the_runner_fingerprints_the_attack_the_defense_and_the_row_code(tiny_config, monkeypatch):
    from leakbench.evaluation import load_config, runner, store

    seen = []
    monkeypatch.setattr(store, "code_fingerprint", lambda *modules: seen.append(modules) or "fp")
    cells = load_config(tiny_config).cells()
    assert runner.Matrix.cell_fingerprint(cells[1]) == "fp"
    assert seen == [("leakbench.attacks.rmle", "leakbench.defenses.noise", *store.ROW_MODULES)]

