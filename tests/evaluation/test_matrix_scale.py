"""The matrix at scale: zip expansion, resuming after SIGKILL, determinism, the feature cache, the Dask
executor and export. CPU-small: ResNet-20 on digits, 1 epoch, 2 images, a few solver iterations."""
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from harness import ROOT
from leakbench import defenses
from leakbench.evaluation import ConfigError, ExperimentConfig, Matrix, ResultStore, load_config
from leakbench.evaluation.cli import main
from leakbench.splitnn.training import CACHE_ENV

METRICS = ["accuracy", "mse", "psnr", "ssim", "psnr_ci_low", "psnr_ci_high"]

CONFIG = """
name: scale
seed: 0
dataset: {name: digits, params: {size: 16}}  # 16x16: a 4x cheaper target and judge
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses:
  - none
  - {name: gaussian_noise, zip: {scale: [0.5, 0.1], relative: [true, false]}}
attacks:
  - {name: rmle, params: {iterations: 5}}
  - {name: peel, params: {max_iter: 5, refine_iter: 5, also_from_grey: false}}
evaluation: {num_images: 2}
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "scale.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return path


def _raw(**overrides):
    import yaml

    raw = yaml.safe_load(textwrap.dedent(CONFIG))
    raw.update(overrides)
    return raw


def _rows(store: ResultStore) -> pd.DataFrame:
    return store.cells().set_index("cell_key").sort_index()


# -- zip ------------------------------------------------------------------------------------------
def test_zip_pairs_parameters_instead_of_crossing_them(config_path):
    cells = load_config(config_path).cells()
    noise = [c["defense"]["params"] for c in cells if c["defense"]["name"] == "gaussian_noise"]
    pairs = {(p["scale"], p["relative"]) for p in noise}
    assert pairs == {(0.5, True), (0.1, False)}  # paired, not the 4 of a cross product
    assert len(cells) == 3 * 2 and len({c.key for c in cells}) == 6


@pytest.mark.parametrize("entry, key", [
    ({"name": "gaussian_noise", "zip": {"scale": [0.5, 0.1], "relative": [True]}}, "defenses[1].zip.relative"),
    ({"name": "gaussian_noise", "zip": {"scale": [0.5, -1.0]}}, "defenses[1].zip.scale[1]"),
    ({"name": "gaussian_noise", "zip": {"scale": 0.5}}, "defenses[1].zip.scale"),
    ({"name": "gaussian_noise", "zip": {"scael": [0.5]}}, "defenses[1].zip.scael[0]"),
    ({"name": "gaussian_noise", "params": {"scale": 1.0}, "zip": {"scale": [0.5]}}, "defenses[1].zip.scale"),
    ({"name": "gaussian_noise", "zip": []}, "defenses[1].zip"),
])
def test_bad_zip_names_the_key(entry, key):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig(_raw(defenses=["none", entry]))
    assert info.value.key == key


def test_bad_zip_exits_2_from_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(CONFIG).replace("relative: [true, false]", "relative: [true]"))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "defenses[1].zip.relative" in capsys.readouterr().err and not out.exists()


# -- caching, determinism, failures ---------------------------------------------------------------
def test_attacks_on_one_defense_share_model_and_features_and_rows_are_reproducible(config_path, tmp_path):
    config = load_config(config_path)
    with ResultStore(tmp_path / "a.sqlite") as store:
        summary = Matrix(config, progress=False).run(store)
        first = _rows(store)
    assert summary.done == 6
    # 3 defenses x 2 attacks: features computed once per defense, the model trained/loaded once.
    assert summary.cache["features_miss"] == 3 and summary.cache["features_hit"] == 3
    assert summary.cache["model_miss"] == 1 and summary.cache["model_hit"] == 5
    with ResultStore(tmp_path / "b.sqlite") as store:  # a fresh store, a fresh Matrix: same rows
        Matrix(config, progress=False).run(store)
        second = _rows(store)
    assert list(first.index) == list(second.index)
    pd.testing.assert_frame_equal(first[METRICS], second[METRICS])


def test_non_finite_features_fail_the_cell_not_the_run(config_path, tmp_path, monkeypatch):
    noise = type(defenses.get("gaussian_noise", scale=0.5))
    monkeypatch.setattr(noise, "__call__", lambda self, features: features * float("nan"))
    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = Matrix(load_config(config_path), progress=False).run(store)
        cells = store.cells()
    assert summary.failed == 4 and summary.done == 2
    failed = cells[cells.status == "failed"]
    assert set(failed.defense) == {"gaussian_noise"} and failed.reason.str.contains("NonFiniteFeatures").all()


# -- resuming after SIGKILL -----------------------------------------------------------------------
#: ``leakbench run`` as a user runs it, except that it says on stdout when the second cell starts (the
#: first is then stored) and waits there: the test's SIGKILL lands mid-grid on any machine, at any speed.
KILLABLE_RUN = """
import sys
from leakbench.evaluation import runner
from leakbench.evaluation.cli import main
from leakbench.splitnn.training import CACHE_ENV

compute, started = runner.Matrix.compute_cell, []

def announced(self, cell):
    started.append(cell.key)
    if len(started) == 2:
        print("second cell started", flush=True)
        sys.stdin.readline()  # never answered: the test kills the process here
    return compute(self, cell)

runner.Matrix.compute_cell = announced
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_mid_grid_resumes_without_losing_or_repeating_cells(config_path, tmp_path):
    out = tmp_path / "out"
    db = out / "results.sqlite"
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, "run", str(config_path), "--out", str(out),
                                    "--quiet"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    try:
        lines = iter(process.stdout.readline, "")  # until the announcement, or EOF if the run ended first
        assert "second cell started\n" in lines, f"the run ended before its second cell: {errors.read_text()}"
        process.kill()  # SIGKILL while the second cell is in flight: no cleanup, no finally blocks
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdin.close()
        process.stdout.close()
    with ResultStore(db) as store:
        before = _rows(store)
        killed_run = store.runs().iloc[-1]
    total = len(load_config(config_path).cells())
    assert len(before) == 1 and total > 2  # the first cell stored, the second lost in flight, the rest to do
    assert pd.isna(killed_run.finished_at)

    with ResultStore(db) as store:
        summary = Matrix(load_config(config_path), progress=False).run(store)
        after = _rows(store)
    assert summary.skipped == len(before) and summary.done == total - len(before)
    assert sorted(after.index) == sorted(c.key for c in load_config(config_path).cells())  # each cell once
    assert set(after.status) == {"done"}
    kept = after.loc[before.index]  # finished cells were not recomputed
    pd.testing.assert_series_equal(kept.finished_at, before.finished_at)
    pd.testing.assert_series_equal(kept.run_id, before.run_id)
    assert set(after.drop(before.index).run_id) == {summary.run_id}


# -- Dask -----------------------------------------------------------------------------------------
def test_dask_local_cluster_gives_the_same_rows_as_sequential(config_path, tmp_path):
    pytest.importorskip("dask.distributed")
    from leakbench.evaluation.executors import Dask

    config = load_config(config_path)
    cache = os.environ[CACHE_ENV]  # the session's: the evaluation classifier is trained once, not per test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use one thread; compare like with like
    try:
        with ResultStore(tmp_path / "seq.sqlite") as store:
            Matrix(config, cache_dir=cache, progress=False).run(store)
            sequential = _rows(store)
    finally:
        torch.set_num_threads(threads)
    with ResultStore(tmp_path / "dask.sqlite") as store:
        summary = Matrix(config, cache_dir=cache, progress=False).run(store, Dask("local", workers=2))
        distributed = _rows(store)
        provenance = store.runs().provenance_json.iloc[0]
    assert summary.done == 6 and "dask local" in provenance
    assert list(sequential.index) == list(distributed.index)
    pd.testing.assert_frame_equal(sequential[METRICS + ["status"]], distributed[METRICS + ["status"]])


def test_a_cell_failing_on_a_dask_worker_is_stored_as_failed(config_path, tmp_path):
    pytest.importorskip("dask.distributed")
    from leakbench.evaluation.executors import Dask

    config_path.write_text(textwrap.dedent(CONFIG).replace("  - {name: peel, params: {max_iter: 5, "
                                                            "refine_iter: 5, also_from_grey: false}}\n", ""))
    config = load_config(config_path)
    cells = config.cells()

    class Poisoned(Matrix):
        def _compute(self, cell):
            if cell["defense"]["name"] == "none":
                raise RuntimeError("boom on a worker")
            return super()._compute(cell)

    with ResultStore(tmp_path / "r.sqlite") as store:
        summary = Poisoned(config, progress=False).run(store, Dask("local", workers=2))
        rows = store.cells()
    assert summary.failed == 1 and summary.done == len(cells) - 1
    assert rows[rows.status == "failed"].reason.str.contains("boom on a worker").all()


# -- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_cells_and_images(config_path, tmp_path, capsys, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    config_path.write_text(textwrap.dedent(CONFIG).replace(
        "  - {name: peel, params: {max_iter: 5, refine_iter: 5, also_from_grey: false}}\n", ""))
    out = tmp_path / "out"
    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    assert "defended features 0 hits / 3 misses" in capsys.readouterr().out
    assert main(["export", str(out), "--format", fmt, "--out", str(tmp_path / "rows")]) == 0
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    cells = read(tmp_path / f"rows.{fmt}")
    images = read(tmp_path / f"rows_images.{fmt}")
    assert len(cells) == 3 and set(cells.status) == {"done"} and "cell_key" in cells and "psnr" in cells
    assert len(images) == 3 * 2 and {"cell_key", "image_index", "psnr", "defense", "attack"} <= set(images)


def test_export_of_a_missing_store_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
