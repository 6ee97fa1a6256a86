import textwrap

import pytest

import attacks
from evaluation import Matrix, ResultStore, load_config
from evaluation.cli import main

CONFIG = """
name: tiny
seed: 0
dataset: digits
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses:
  - none
  - {name: gaussian_noise, params: {scale: 0.5}}
attacks:
  - {name: rmle, params: {iterations: 10}}
  - {name: peel, params: {max_iter: 5, fixed_point_iters: 5}}
evaluation: {num_images: 3}
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return path


def test_run_writes_store_table_and_grid_then_skips_finished_cells(config_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    assert (out / "results.sqlite").exists() and (out / "reconstructions.png").exists()
    table = (out / "table.md").read_text()
    assert table.count("| done") == 4 and "psnr" in table and "accuracy" in table
    with ResultStore(out / "results.sqlite") as store:
        cells = store.cells()
        assert len(cells) == 4 and set(cells.status) == {"done"}
        assert cells.accuracy.between(0, 1).all()
        assert len(store.images()) == 4 * 3  # one row per image per cell
        assert store.runs().provenance_json.str.contains("torch").all()
    capsys.readouterr()
    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    assert "0 done, 4 already done" in capsys.readouterr().out
    with ResultStore(out / "results.sqlite") as store:
        assert len(store.cells()) == 4 and len(store.runs()) == 2


def test_a_failing_cell_is_stored_and_the_others_complete(config_path, tmp_path, monkeypatch):
    def broken(self, client, features, **ctx):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(attacks.RMLE, "reconstruct", broken)
    config = load_config(config_path)
    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = Matrix(config, progress=False).run(store)
        cells = store.cells()
    assert summary.failed == 2 and summary.done == 2
    failed = cells[cells.status == "failed"]
    assert set(failed.attack) == {"rmle"} and failed.reason.str.contains("solver exploded").all()
    assert set(cells[cells.status == "done"].attack) == {"peel"}


def test_unsupported_client_becomes_not_applicable(config_path, tmp_path, monkeypatch):
    monkeypatch.setattr(attacks.PEEL, "supports", lambda self, client, defense=None: (False, "no inverse here"))
    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = Matrix(load_config(config_path), progress=False).run(store)
        cells = store.cells()
    assert summary.not_applicable == 2
    assert (cells[cells.attack == "peel"].reason == "no inverse here").all()


def test_cell_keys_cover_resolved_defaults(config_path):
    cells = load_config(config_path).cells()
    assert len({c.key for c in cells}) == len(cells)
    assert cells[0]["attack"]["params"]["tv_weight"] == 0.0  # the default is part of the key
