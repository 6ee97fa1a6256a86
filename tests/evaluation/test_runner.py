"""The matrix runner on the tiny 4-cell config (harness.FOUR_CELLS): store, table and grid; skipping finished
cells; stale rows after an edit; failing and unsupported cells."""
import re

import pandas as pd
import pytest

from harness import FOUR_CELLS, write_config
from leakbench import attacks
from leakbench.evaluation import Matrix, ResultStore, load_config
from leakbench.evaluation.cli import main

@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path, FOUR_CELLS, "tiny.yaml")


def test_run_writes_store_table_and_grid_then_skips_finished_cells(config_path, tmp_path, monkeypatch, capsys):
    """A rerun skips every cell; then an edit of PEEL (in a copy of the source tree that the fingerprints read)
    makes exactly PEEL's cells stale: a config of the rMLE cells alone shows them with the stale count, and a
    rerun of the whole config recomputes PEEL's cells only."""
    out = tmp_path / "out"
    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    assert (out / "results.sqlite").exists() and (out / "reconstructions.png").exists()
    table = (out / "table.md").read_text()
    # the 4 cells and one strongest-attacker row per defense (evaluation.strongest)
    assert table.count("| done") == 6 and table.count("| strongest") == 2 and "psnr" in table and "accuracy" in table
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
        first = store.cells()
    assert first.code_fingerprint.notna().all() and first.is_current.all()
    assert "no stale rows" in (out / "table.md").read_text()
    _edit_peel_in_a_copy(tmp_path / "src", monkeypatch)
    with ResultStore(out / "results.sqlite") as store:
        cells = store.cells()
    assert dict(zip(cells.attack, cells.is_current)) == {"rmle": True, "peel": False}

    rmle_only = tmp_path / "rmle.yaml"
    assert PEEL_LINE in config_path.read_text()
    rmle_only.write_text(config_path.read_text().replace(PEEL_LINE, ""))
    assert main(["run", str(rmle_only), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "0 done, 2 already done" in printed and "holds 2 stale rows" in printed
    table = (out / "table.md").read_text()
    assert table.count("| done") == 2 and "peel" not in table and "holds 2 stale rows" in table
    assert main(["report", str(out)]) == 0 and main(["export", str(out)]) == 0
    html = (out / "report.html").read_text()
    text = re.sub(r"data:image/png;base64,[^\"]*", "", html.split('id="provenance"')[0])  # before the configs
    assert "holds 2 stale rows" in html and "rmle" in text and "peel" not in text
    exported = pd.read_csv(out / "cells.csv")
    assert dict(zip(exported.attack, exported.is_current)) == {"rmle": True, "peel": False}
    assert exported.code_fingerprint.notna().all()
    assert set(pd.read_csv(out / "cells_images.csv").is_current) == {True, False}

    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 done (2 recomputed: stored by other code), 2 already done" in printed and "no stale rows" in printed
    with ResultStore(out / "results.sqlite") as store:
        cells = store.cells()
    assert len(cells) == 4 and cells.is_current.all() and (out / "table.md").read_text().count("| done") == 6
    peel = cells.attack == "peel"
    assert (cells[peel].finished_at > first[first.attack == "peel"].finished_at.max()).all()  # new rows
    assert set(cells[~peel].finished_at) == set(first[first.attack == "rmle"].finished_at)  # untouched


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
    assert cells[0]["attack"]["params"]["tv_weight"] == attacks.RMLE().tv_weight  # the default is part of the key


PEEL_LINE = "  - {name: peel, params: {max_iter: 5, fixed_point_iters: 5}}\n"


def _edit_peel_in_a_copy(root, monkeypatch):
    """Copy the project's packages to ``root``, edit PEEL there and make the fingerprints read that copy."""
    import shutil

    from leakbench.splitnn import fingerprint

    for package in (*fingerprint.PROJECT, fingerprint.NAMESPACE):
        shutil.copytree(fingerprint.ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    attack = root / "attacks" / "peel" / "attack.py"
    attack.write_text(attack.read_text() + "\n# an edit\n")
    monkeypatch.setattr(fingerprint, "ROOT", root)


def test_recompute_forces_the_cells_of_an_attack_or_defense(tiny_config, tmp_path, capsys):
    config, out = tiny_config, tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(out), "--quiet", "--recompute", "gaussian_noise"]) == 0
    assert "1 done (1 recomputed: --recompute), 1 already done" in capsys.readouterr().out
    assert main(["run", str(config), "--out", str(out), "--quiet", "--recompute", "rmle",
                 "--recompute", "none"]) == 0
    assert "2 done (2 recomputed: --recompute), 0 already done" in capsys.readouterr().out
    assert main(["run", str(config), "--out", str(tmp_path / "other"), "--recompute", "peel"]) == 2
    err = capsys.readouterr().err
    assert "--recompute" in err and "'peel'" in err and "rmle" in err and err.count("\n") == 1
    assert not (tmp_path / "other").exists()  # nothing written


def test_a_store_from_before_fingerprints_is_migrated_and_its_rows_are_stale(tiny_config, tmp_path):
    import sqlite3

    config = load_config(tiny_config)
    path = tmp_path / "old.sqlite"
    with ResultStore(path) as store:
        for cell in config.cells():
            store.write_cell(cell.key, "old", cell.config, "done", accuracy=0.5, summary={"psnr": (9.0, 8.0, 10.0)})
    with sqlite3.connect(path) as old:  # the schema before this column existed
        old.execute("ALTER TABLE cells DROP COLUMN code_fingerprint")
    with ResultStore(path) as store:
        cells = store.cells()
        assert "code_fingerprint" in cells and not cells.is_current.any()
        summary = Matrix(config, progress=False).run(store)
        cells = store.cells()
    assert (summary.done, summary.stale, summary.skipped) == (2, 2, 0)
    assert cells.is_current.all() and (cells.psnr != 9.0).all()


def test_extra_columns_are_typed_added_on_first_use_and_validated(tiny_config, tmp_path):
    config = load_config(tiny_config).cells()[0].config
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.write_cell("a", "run", config, "done", extra={"budget_end_to_end_evaluations": 300, "evaluator": None})
        store.write_cell("b", "run", config, "done", extra={"budget_end_to_end_evaluations": None,
                                                            "evaluator": "resnet20 on digits"})
        types = {row[1]: row[2] for row in store.connection.execute("PRAGMA table_info(cells)")}
        cells = store.cells()
        for bad in ({"no spaces": 1}, {"accuracy": 1.0}, {"evaluator": [1]}):
            with pytest.raises(ValueError):
                store.write_cell("c", "run", config, "done", extra=bad)
    assert types["budget_end_to_end_evaluations"] == "REAL" and types["evaluator"] == "TEXT"
    assert cells.budget_end_to_end_evaluations.tolist()[0] == 300.0
    assert cells.evaluator.tolist()[1] == "resnet20 on digits"
