"""Faults injected on every write path, in the manner of SQLite's own fault tests: a full disk (SQLite's page
limit, /dev/full), kills and exceptions at every statement of a cell's store write, corrupt checkpoints and
caches, an unwritable --out, two writers on one folder, stores of other layouts, NaN and perfect
reconstructions. After each fault the store holds every cell that finished before it, exactly once."""
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import leakbench.attacks.rmle  # noqa: F401  (the submodules below are used as attributes)
import leakbench.evaluation.runner  # noqa: F401
import leakbench.splitnn.training  # noqa: F401
from harness import TINY_CONFIG, swap, without_judge, write_config
from leakbench import attacks, defenses, evaluation, splitnn
from leakbench.attacks.cache import cached_module
from leakbench.evaluation import Matrix, ResultStore, load_config
from leakbench.evaluation.cli import main
from leakbench.evaluation.executors import Dask
from leakbench.evaluation.image_sets import attacked_indices
from leakbench.evaluation.store import SCHEMA_VERSION, StoreVersionError
from leakbench.evaluation.store_lock import LOCK_NAME, RunLock, StoreBusy, holder
from leakbench.splitnn import datasets
from leakbench.splitnn.faults import CorruptCacheWarning, WriteFailure
from leakbench.splitnn.training import TrainConfig, atomic_save, train

#: Two cells (undefended and noise, rMLE for 5 iterations, 2 images, no judge): about a second from the cache.
TINY = without_judge(TINY_CONFIG)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, TINY, "tiny.yaml")


@pytest.fixture
def two_seeds(tmp_path):
    """Seeds 0 and 1: two models (untrained, so cheap to build again), the cells of seed 0 first."""
    text = swap(swap(TINY, "seed: 0", "seed: [0, 1]"), "epochs: 1", "epochs: 0")
    return write_config(tmp_path, swap(text, "  - {name: gaussian_noise, params: {scale: 0.1}}\n", ""), "seeds.yaml")


def _run(config, out, *extra):
    return main(["run", str(config), "--out", str(out), "--quiet", *extra])


def _stored(out) -> dict[str, int]:
    """cell_key -> how many rows the store holds for it (done cells only), read without the store's code."""
    connection = sqlite3.connect(Path(out) / "results.sqlite")
    try:
        rows = connection.execute("SELECT cell_key, count(*) FROM cells WHERE status = 'done' GROUP BY cell_key")
        return dict(rows.fetchall())
    finally:
        connection.close()


def _keys(config) -> list[str]:
    return [cell.key for cell in load_config(config).cells()]


# -- a full disk ---------------------------------------------------------------------------------------------
def test_full_disk_at_a_store_write_exits_2_naming_the_store_and_keeps_the_finished_cell(config, tmp_path,
                                                                                        monkeypatch, capsys):
    """The kernel refuses to grow any file past its size (RLIMIT_FSIZE, SIGXFSZ ignored) during the second
    cell's write, as a full disk would: SQLite's write fails inside its transaction."""
    out = tmp_path / "out"
    original = ResultStore.write_cell
    calls = []

    def write_cell(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) != 2:
            return original(self, *args, **kwargs)
        sizes = [p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists()]
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes), hard))
        try:
            return original(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(ResultStore, "write_cell", write_cell)
    assert _run(config, out) == 2
    err = capsys.readouterr().err
    assert re.search(rf"cannot write {re.escape(str(out / 'results.sqlite'))}: "
                     r"(disk I/O error|database or disk is full)", err), err
    assert "Traceback" not in err and err.count("\n") == 1
    first, second = _keys(config)
    assert _stored(out) == {first: 1}  # the finished cell, once; none of the second
    monkeypatch.setattr(ResultStore, "write_cell", original)  # space freed: the rerun resumes after it
    assert _run(config, out) == 0
    assert "1 done, 1 already done" in capsys.readouterr().out
    assert _stored(out) == {first: 1, second: 1}


def test_full_disk_writing_the_outputs_exits_2_naming_the_file_with_every_cell_stored(config, tmp_path, capsys):
    """A real ENOSPC from the kernel: table.md is a link to /dev/full."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").symlink_to("/dev/full")
    assert _run(config, out) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out / 'table.md'}: No space left on device" in err and "Traceback" not in err
    assert _stored(out) == dict.fromkeys(_keys(config), 1)


def test_full_disk_writing_a_checkpoint_stops_the_run_keeping_the_cells_before(two_seeds, tmp_path,
                                                                                monkeypatch, capsys):
    """The second model's checkpoint goes to a temporary file on /dev/full: the run stops with the checkpoint's
    name (not the temporary one), the first model's cells stay stored, and no temporary file is left."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cells = load_config(two_seeds).cells()
    second_model = cells[1].train_config().key()
    real = splitnn.training.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        handle, name = real(*args, **kwargs)
        if Path(name).name.startswith(f".{second_model}"):
            os.close(handle)
            return os.open("/dev/full", os.O_WRONLY), name
        return handle, name

    monkeypatch.setattr(splitnn.training.tempfile, "mkstemp", mkstemp)
    assert _run(two_seeds, out, "--cache-dir", str(cache)) == 2
    err = capsys.readouterr().err
    models = cache / "models"
    assert re.search(rf"cannot write {re.escape(str(models))}/{second_model}-\w+\.pt: No space left on device", err)
    assert "Traceback" not in err
    assert _stored(out) == {cells[0].key: 1}
    assert not list(models.glob(f"{second_model}*")) and not list(models.glob(f".{second_model}*"))


# -- an unwritable --out, a missing store ---------------------------------------------------------------------
def test_unwritable_out_says_cannot_write_and_reads_still_say_cannot_read(config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _run(config, blocker / "out") == 2
    err = capsys.readouterr().err
    assert f"cannot write {blocker / 'out'}: Not a directory" in err and "cannot read" not in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert f"cannot read {tmp_path / 'missing.yaml'}" in capsys.readouterr().err
    for command in (["report", str(tmp_path)], ["export", str(tmp_path)]):  # no store: said so, none created
        assert main(command) == 2
        assert "cannot read" in capsys.readouterr().err and not (tmp_path / "results.sqlite").exists()


# -- kills and exceptions inside a cell's store write -------------------------------------------------------------
def _cell_config(key: str) -> dict:
    return {"dataset": {"name": "digits", "params": {}}, "model": {"name": "resnet20", "params": {}},
            "train": {"epochs": 0}, "cut": "layer1", "defense": {"name": "none", "params": {}},
            "attack": {"name": "rmle", "params": {}}, "seed": 0, "evaluation": {"num_images": 2}, "key": key}


def _write(store: ResultStore, key: str, run_id: str, psnr: float = 20.0) -> None:
    store.write_cell(key, run_id, _cell_config(key), "done", accuracy=0.5,
                     summary={"psnr": (psnr, psnr - 1, psnr + 1)}, per_image={"psnr": [psnr, psnr]},
                     reconstruction=torch.zeros(2, 1, 8, 8), extra={f"budget_{key}": 1.0})


def _cells_then(path: str, rewrite: bool, trace) -> None:
    """Two cells written whole, then ``trace`` on every statement of writing a third (or of rewriting the
    second, with other values)."""
    with ResultStore(path) as store:
        run_id = store.start_run({}, {})
        _write(store, "a", run_id)
        _write(store, "b", run_id)
        store.connection.set_trace_callback(trace)
        _write(store, "b" if rewrite else "c", run_id, psnr=99.0)


def _killed_writer(path: str, point: int, rewrite: bool) -> None:
    """In a child: killed (``os._exit``, no cleanup) at statement ``point`` of the last write of _cells_then."""
    count = [0]

    def trace(statement):
        count[0] += 1
        if count[0] == point:
            os._exit(9)

    _cells_then(path, rewrite, trace)
    os._exit(0)


def _assert_whole(path: Path, expected: dict[str, float]) -> None:
    """The store holds exactly the cells of ``expected`` (key -> psnr), each once, with its images whole."""
    with ResultStore(path) as store:
        cells = store.cells()
        assert sorted(cells.cell_key) == sorted(expected)
        assert dict(zip(cells.cell_key, cells.psnr)) == expected
        images = store.images()
        assert images.groupby("cell_key").size().to_dict() == dict.fromkeys(expected, 2)
        assert all(store.reconstruction(key) is not None for key in expected)
        run_id = store.start_run({}, {})
        _write(store, "after", run_id)  # the store still takes writes
        assert store.status("after") == "done"


@pytest.mark.parametrize("rewrite", [False, True], ids=["new cell", "rewritten cell"])
def test_a_kill_at_every_statement_of_a_store_write_keeps_every_finished_cell_once(tmp_path, rewrite):
    seen = []
    _cells_then(str(tmp_path / "count.sqlite"), rewrite, seen.append)
    statements = len(seen)
    assert statements >= 8  # BEGIN, the column checks, the cell, its images, its reconstruction, COMMIT
    context = multiprocessing.get_context("fork")
    for point in range(1, statements + 2):  # the last point is past the commit: the cell is whole
        path = tmp_path / f"killed-{point}.sqlite"
        child = context.Process(target=_killed_writer, args=(str(path), point, rewrite))
        child.start()
        child.join(60)
        assert child.exitcode == (9 if point <= statements else 0), point
        committed = point > statements
        expected = {"a": 20.0, "b": 99.0 if rewrite and committed else 20.0}
        if committed and not rewrite:
            expected["c"] = 99.0
        _assert_whole(path, expected)


class _FailingConnection:
    """A connection whose ``point``-th call (execute, executemany or commit) raises, the others delegated."""

    def __init__(self, connection: sqlite3.Connection, point: int):
        self._connection, self._point, self.calls = connection, point, 0

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self._point:
            raise sqlite3.OperationalError("injected fault")

    def execute(self, *args):
        self._tick()
        return self._connection.execute(*args)

    def executemany(self, *args):
        self._tick()
        return self._connection.executemany(*args)

    def commit(self):
        self._tick()
        return self._connection.commit()

    def __getattr__(self, name):
        return getattr(self._connection, name)


def test_an_exception_at_every_call_of_a_store_write_rolls_it_back_whole(tmp_path):
    with ResultStore(tmp_path / "count.sqlite") as store:
        run_id = store.start_run({}, {})
        _write(store, "warmup", run_id)
        counting = store.connection = _FailingConnection(store.connection, point=0)
        _write(store, "counted", run_id)
        calls = counting.calls
    assert calls >= 6
    for point in range(1, calls + 1):
        path = tmp_path / f"failed-{point}.sqlite"
        with ResultStore(path) as store:
            run_id = store.start_run({}, {})
            _write(store, "a", run_id)
            real = store.connection
            store.connection = _FailingConnection(real, point)
            with pytest.raises(sqlite3.OperationalError, match="injected"):
                _write(store, "c", run_id)
            store.connection = real
        _assert_whole(path, {"a": 20.0})


# -- corrupt checkpoints and caches --------------------------------------------------------------------------
def _corrupt(kind: str, path: Path) -> None:
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 64)
    elif kind == "other architecture":
        torch.save({"conv1.weight": torch.zeros(1)}, path)
    else:  # the JSON sidecar
        path.with_suffix(".json").write_text("{ half a sidecar")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "other architecture", "sidecar"])
def test_a_corrupt_checkpoint_is_moved_aside_named_and_retrained(tmp_path, kind):
    config = TrainConfig(model="resnet20", dataset="digits", epochs=0, seed=3)
    first = train(config, tmp_path, progress=False)
    path = first.path
    _corrupt(kind, path)
    broken = path.read_bytes() if kind != "sidecar" else path.with_suffix(".json").read_bytes()
    with pytest.warns(CorruptCacheWarning) as caught:
        second = train(config, tmp_path, progress=False)
    message = str(caught[0].message)
    aside = [p for p in path.parent.iterdir() if ".corrupt-" in p.name]
    assert str(path) in message and any(str(p) in message for p in aside)
    assert len(aside) == 2  # the checkpoint and its sidecar, kept for inspection
    kept = next(p for p in aside if p.name.startswith(path.name if kind != "sidecar" else path.stem + ".json"))
    assert kept.read_bytes() == broken
    assert not second.from_cache and second.path == path
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)  # retrained from the seed: the same weights
    assert train(config, tmp_path, progress=False).from_cache  # and the new checkpoint loads


def test_a_corrupt_checkpoint_of_a_training_defense_is_retrained_with_its_defense(tmp_path):
    """DP-SGD's checkpoint (a GroupNorm model with the epsilon spent beside it) truncated: the model is built and
    prepared again by a fresh defense, trained again, and its guarantee recorded again."""
    data = datasets.get("digits", size=16)
    config = TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=1, batch_size=128, lr=0.1,
                         defense={"name": "dp_sgd", "params": {"epsilon": 4.0, "delta": 1e-5}})
    first = train(config, tmp_path, hooks=defenses.hooks_for(config), data=data, progress=False)
    _corrupt("truncated", first.path)
    with pytest.warns(CorruptCacheWarning, match="moved it to"):
        second = train(config, tmp_path, hooks=defenses.hooks_for(config), data=data, progress=False)
    assert not second.from_cache and any(isinstance(m, nn.GroupNorm) for m in second.model.modules())
    assert second.hooks.guarantee()["epsilon"] == pytest.approx(first.hooks.guarantee()["epsilon"], rel=1e-6)
    again = train(config, tmp_path, hooks=defenses.hooks_for(config), data=data, progress=False)
    assert again.from_cache and again.hooks.guarantee()["epsilon"] == second.hooks.guarantee()["epsilon"]


def test_a_corrupt_attack_cache_is_moved_aside_and_trained_from_the_untouched_module(tmp_path):
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    seen = []

    def fit(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        with torch.no_grad():
            m.weight.fill_(0.5)

    key = {"model": "m", "cut": "c"}
    _, from_cache = cached_module(module, "probe", key, tmp_path, fit, fingerprint="f")
    assert not from_cache
    path = next((tmp_path / "attacks").glob("probe-*.pt"))
    torch.save({"weight": torch.full((2, 3), 7.0), "bias": torch.zeros(5)}, path)  # loads half, then fails
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(initial)
    with pytest.warns(CorruptCacheWarning, match=str(path)):
        loaded, from_cache = cached_module(fresh, "probe", key, tmp_path, fit, fingerprint="f")
    assert not from_cache and loaded is fresh
    assert torch.equal(seen[-1]["weight"], initial["weight"])  # not the half-loaded 7s
    assert len(list((tmp_path / "attacks").glob("probe-*.pt.corrupt-*"))) == 1
    assert cached_module(nn.Linear(3, 2), "probe", key, tmp_path, fit, fingerprint="f")[1]


# -- atomic writes -----------------------------------------------------------------------------------------------
def _interleave(path: Path) -> tuple[dict[str, bytes], list[Exception]]:
    """Writer A writes half its state dict and waits; writer B writes all of its own and renames; then A
    finishes and renames."""
    a_started, b_done = threading.Event(), threading.Event()
    blobs = {}
    for name, value in (("a", 1.0), ("b", 2.0)):
        buffer = io.BytesIO()
        torch.save({"w": torch.full((2000,), value)}, buffer)
        blobs[name] = buffer.getvalue()

    def write_a(file):
        file.write(blobs["a"][: len(blobs["a"]) // 2])
        file.flush()
        a_started.set()
        b_done.wait(10)
        file.write(blobs["a"][len(blobs["a"]) // 2:])

    errors = []
    thread = threading.Thread(target=lambda: _guard(errors, lambda: atomic_save(path, write_a)))
    thread.start()
    a_started.wait(10)
    _guard(errors, lambda: atomic_save(path, lambda file: file.write(blobs["b"])))
    b_done.set()
    thread.join(10)
    return blobs, errors


def _guard(errors, call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - recorded for the assertion
        errors.append(exc)


def test_concurrent_atomic_saves_leave_one_writers_whole_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    blobs, errors = _interleave(path)
    assert not errors and path.read_bytes() == blobs["a"]  # the last to rename wins, whole
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.full((2000,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left

    # The coupling injected: both writers given one temporary name. The file then holds neither's bytes.
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(splitnn.training.tempfile, "mkstemp", lambda dir, prefix, suffix: (
        os.open(Path(dir) / "one.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(Path(dir) / "one.tmp")))
    blobs, _ = _interleave(shared / "ckpt.pt")
    assert (shared / "ckpt.pt").read_bytes() not in (blobs["a"], blobs["b"])


def test_atomic_save_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(splitnn.training.os, "fsync",
                        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(splitnn.training.os, "replace",
                        lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    atomic_save(tmp_path / "x.bin", lambda file: file.write(b"data"))
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1] == os.path.realpath(events[1][1]) != os.path.realpath(tmp_path / "x.bin")  # the temporary
    assert events[2][1] == os.path.realpath(tmp_path)  # then the folder that holds the rename


def test_a_failed_atomic_save_names_the_target_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    real = splitnn.training.tempfile.mkstemp

    def on_dev_full(**kwargs):
        handle, name = real(**kwargs)
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(splitnn.training.tempfile, "mkstemp", on_dev_full)
    with pytest.raises(WriteFailure) as caught:
        atomic_save(tmp_path / "x.bin", lambda file: file.write(b"data" * 10000))
    assert str(caught.value) == f"cannot write {tmp_path / 'x.bin'}: No space left on device"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.bin")] and not (tmp_path / "x.bin").exists()


# -- one writer per store ------------------------------------------------------------------------------------------
def test_a_second_run_on_a_folder_being_written_exits_2_naming_the_writer(config, tmp_path, capsys):
    out = tmp_path / "out"
    with RunLock(out):
        assert _run(config, out) == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by process {os.getpid()} since 20" in err and "--wait" in err
    assert not (out / "results.sqlite").exists()  # it never opened the store


HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_refuses_and_its_death_frees_the_folder(tmp_path):
    lock = tmp_path / LOCK_NAME
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusy, match=f"being written by process {child.pid} since"):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    assert holder(lock)[0] == child.pid  # the dead process's record is still there ...
    with RunLock(tmp_path):  # ... but the kernel released its flock: a stale lock never blocks
        assert holder(lock)[0] == os.getpid()
    assert holder(lock) == (None, None)  # released: the record is cleared


def test_wait_starts_when_the_writer_finishes(config, tmp_path, capsys):
    out = tmp_path / "out"
    lock = RunLock(out).acquire()
    released = []

    def release():
        time.sleep(1.0)
        released.append(time.time())
        lock.release()

    thread = threading.Thread(target=release)
    thread.start()
    assert _run(config, out, "--wait") == 0
    finished = time.time()
    thread.join()
    err = capsys.readouterr().err
    assert f"{out} is being written by process {os.getpid()}" in err and "waiting for it to finish (--wait)" in err
    assert finished > released[0]
    assert _stored(out) == dict.fromkeys(_keys(config), 1)


def test_workers_below_one_are_refused_before_any_work(config, tmp_path, capsys):
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as caught:
            _run(config, tmp_path / "out", "--dask", "local", "--workers", bad)
        assert caught.value.code == 2 and "--workers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="at least 1"):
        Dask("local", workers=0)


# -- the store's layout version ------------------------------------------------------------------------------
#: The store's layout before versions (version 0): no code_fingerprint column, user_version 0.
VERSION_0 = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, config_json TEXT,
                   provenance_json TEXT);
CREATE TABLE cells (cell_key TEXT PRIMARY KEY, run_id TEXT, status TEXT NOT NULL, reason TEXT, dataset TEXT,
    model TEXT, cut TEXT, defense TEXT, defense_params TEXT, attack TEXT, attack_params TEXT, seed INTEGER,
    accuracy REAL, guarantee_json TEXT, diagnostics_json TEXT, wall_time_s REAL, peak_rss_mb REAL,
    config_json TEXT, finished_at REAL, psnr REAL, psnr_ci_low REAL, psnr_ci_high REAL);
CREATE TABLE images (cell_key TEXT NOT NULL, image_index INTEGER NOT NULL, psnr REAL,
                     PRIMARY KEY (cell_key, image_index));
CREATE TABLE reconstructions (cell_key TEXT PRIMARY KEY, images BLOB);
"""


def _old_store(folder: Path, config) -> tuple[Path, str]:
    folder.mkdir()
    path = folder / "results.sqlite"
    cell = load_config(config).cells()[0]
    connection = sqlite3.connect(path)
    connection.executescript(VERSION_0)
    connection.execute("INSERT INTO runs VALUES ('old', 1.0, 2.0, '{}', '{}')")
    connection.execute("INSERT INTO cells (cell_key, run_id, status, dataset, model, cut, defense, defense_params, "
                       "attack, attack_params, seed, accuracy, guarantee_json, diagnostics_json, config_json, psnr) "
                       "VALUES (?, 'old', 'done', 'digits', 'resnet20', 'layer1', 'none', '{}', 'rmle', "
                       "'{\"iterations\": 5}', 0, 0.5, '{}', '{}', ?, 12.5)", (cell.key, json.dumps(cell.config)))
    connection.commit()
    connection.close()
    return path, cell.key


def test_a_store_of_the_old_layout_is_read_unchanged_and_migrated_by_a_run(config, tmp_path, capsys):
    out = tmp_path / "out"
    path, key = _old_store(out, config)
    before = path.read_bytes()
    assert main(["export", str(out)]) == 0  # read-only: neither created nor migrated
    assert main(["report", str(out)]) == 1  # its one row is stale (no fingerprint): nothing current to show
    assert "no current cells" in capsys.readouterr().err
    assert path.read_bytes() == before and not Path(f"{path}-wal").exists()
    with ResultStore(path, read_only=True) as store:
        assert store.version == 0 and not store.cells().is_current.any()
    with ResultStore(path) as store:  # a writable open migrates, keeping the row (stale: no fingerprint)
        assert store.version == SCHEMA_VERSION
        cells = store.cells()
        assert list(cells.cell_key) == [key] and cells.psnr[0] == 12.5 and "code_fingerprint" in cells
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    capsys.readouterr()
    assert _run(config, out) == 0
    assert "2 done (1 recomputed: stored by other code)" in capsys.readouterr().out
    assert _stored(out) == dict.fromkeys(_keys(config), 1)


@pytest.mark.parametrize("make, expected", [
    ("PRAGMA user_version = 7", "layout version 7; it reads versions 0 to 1): upgrade leakbench"),
    ("CREATE TABLE something_else (x)", "no cells table"),
])
def test_a_newer_or_foreign_store_is_refused_naming_the_file_and_the_versions(config, tmp_path, capsys, make,
                                                                             expected):
    out = tmp_path / "out"
    out.mkdir()
    path = out / "results.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(VERSION_0 if "user_version" in make else "")
    connection.execute(make)
    connection.commit()
    connection.close()
    before = path.read_bytes()
    with pytest.raises(StoreVersionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ResultStore(path)
    for command in (["run", str(config), "--out", str(out), "--quiet"], ["report", str(out)], ["export", str(out)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert str(path) in err and expected in err and "Traceback" not in err
    assert path.read_bytes() == before


# -- non-finite reconstructions, perfect ones ------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_reconstructions_fail_their_cell_with_the_reason(config, tmp_path, monkeypatch, value):
    original = attacks.rmle.RMLE.reconstruct

    def broken(self, client, features, **ctx):
        recon = original(self, client, features, **ctx)
        recon.images = torch.full_like(recon.images, value)
        return recon

    monkeypatch.setattr(attacks.rmle.RMLE, "reconstruct", broken)
    out = tmp_path / "out"
    assert _run(config, out) == 1  # failed cells: status 1, not a crash
    with ResultStore(out / "results.sqlite", read_only=True) as store:
        cells = store.cells()
        assert list(cells.status) == ["failed", "failed"]
        assert cells.reason.str.contains("NonFiniteReconstruction: rmle returned NaN or infinite").all()
        assert "psnr" not in cells or cells.psnr.isna().all()
        assert store.images().empty


def test_a_perfect_reconstruction_has_infinite_psnr_in_the_run_summary_and_the_report(config, tmp_path,
                                                                                      monkeypatch, capsys):
    """The attack returns the attacked images themselves: PSNR is +inf and its CI NULL; run, report and export
    show it."""
    dataset = load_config(config).cells()[0]["dataset"]
    data = datasets.get(dataset["name"], **dataset["params"])
    truth = data.x_test[attacked_indices(data, 0, 2)]

    def perfect(self, client, features, **ctx):
        from leakbench.attacks.base import Reconstruction

        return Reconstruction(truth.clone(), {"budget": {}})

    monkeypatch.setattr(attacks.rmle.RMLE, "reconstruct", perfect)
    out = tmp_path / "out"
    assert _run(config, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("inf no CI") == 2
    with ResultStore(out / "results.sqlite", read_only=True) as store:
        cells = store.cells()
        assert (cells.psnr == math.inf).all() and cells.psnr_ci_low.isna().all()
    assert main(["report", str(out)]) == 0 and main(["export", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "inf" in html and (out / "heatmap_psnr.png").exists()
    assert re.search(r"\|\s+inf\s+\| no CI", (out / "table.md").read_text())


# -- Dask: a model that fails to train fails its cells only -----------------------------------------------------
class _InProcessDask(Dask):
    """A Dask executor on threads of this process (cheap; the test's patches reach the workers)."""

    def _client(self):
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
        return Client(cluster), cluster


def test_a_failed_training_on_dask_fails_that_models_cells_and_the_run_goes_on(two_seeds, tmp_path, monkeypatch):
    """Seed 1's model fails to train (injected); seed 0's checkpoint is corrupt (moved aside and retrained)."""
    cache = tmp_path / "cache"
    cells = load_config(two_seeds).cells()
    train(cells[0].train_config(), cache, progress=False)
    checkpoint = next((cache / "models").glob(f"{cells[0].train_config().key()}-*.pt"))
    checkpoint.write_bytes(b"corrupt")
    real = evaluation.runner.train

    def failing(config, *args, **kwargs):
        if config.seed == 1:
            raise RuntimeError("injected: no memory for seed 1")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(evaluation.runner, "train", failing)
    threads = torch.get_num_threads()
    try:
        with ResultStore(tmp_path / "results.sqlite") as store, warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptCacheWarning)  # raised on the worker's thread
            summary = Matrix(load_config(two_seeds), cache_dir=str(cache), progress=False).run(store, _InProcessDask())
            stored = store.cells()
    finally:
        torch.set_num_threads(threads)  # the in-process worker set one thread
    assert (summary.done, summary.failed) == (1, 1)
    failed = stored[stored.status == "failed"]
    assert list(failed.cell_key) == [cells[1].key]
    assert failed.reason.iloc[0].startswith("training its model on a Dask worker failed: RuntimeError: injected")
    assert list(checkpoint.parent.glob(f"{checkpoint.name}.corrupt-*"))


# -- two writers on one store file --------------------------------------------------------------------------------
def _race(path: Path) -> list[Exception]:
    """Writer 1 adds a column inside its transaction and holds it for half a second; writer 2 meanwhile
    writes a cell that needs the same new column. Returns writer 2's errors."""
    errors, stored = [], []
    with ResultStore(path) as first:
        run_id = first.start_run({}, {})
        inside = threading.Event()

        def other():  # its own connection, on its own thread
            with ResultStore(path) as second:
                inside.wait(10)
                _guard(errors, lambda: second.write_cell("two", run_id, _cell_config("two"), "done",
                                                         extra={"budget_x": 2.0}))
                if not errors:
                    stored.extend(second.cells().budget_x)

        thread = threading.Thread(target=other)
        thread.start()
        with first.transaction():
            first._ensure_columns("cells", {"budget_x": "REAL"})
            inside.set()
            time.sleep(0.5)
        thread.join(20)
    assert errors or stored == [2.0]
    return errors


def test_a_column_added_by_another_writer_meanwhile_does_not_abort_a_write(tmp_path, monkeypatch):
    """Each write reads the columns inside its own write transaction (BEGIN IMMEDIATE). The coupling injected
    (a deferred BEGIN: columns read from a snapshot, then written) makes the second writer fail."""
    assert _race(tmp_path / "immediate.sqlite") == []

    @contextlib.contextmanager
    def deferred_transaction(self):
        with self._writing():
            self.connection.execute("BEGIN DEFERRED")
            try:
                yield
                self.connection.commit()
            except BaseException:
                self.connection.rollback()
                raise

    monkeypatch.setattr(ResultStore, "transaction", deferred_transaction)
    errors = _race(tmp_path / "deferred.sqlite")
    assert len(errors) == 1 and isinstance(errors[0], (WriteFailure, sqlite3.OperationalError))


# -- report and export: write errors ------------------------------------------------------------------------------
def _hand_written_store(folder: Path) -> Path:
    """A store with one current done cell (rMLE, undefended), written without running anything."""
    from leakbench.evaluation.store import row_fingerprint

    config = _cell_config("one")
    with ResultStore(folder / "results.sqlite") as store:
        store.write_cell("one", store.start_run({}, {}), config, "done", accuracy=0.5,
                         summary={"psnr": (20.0, 19.0, 21.0)}, per_image={"psnr": [20.0, 20.0]},
                         code_fingerprint=row_fingerprint(config))
    return folder / "results.sqlite"


def test_report_and_export_write_errors_say_cannot_write_the_file(tmp_path, capsys):
    _hand_written_store(tmp_path)
    (tmp_path / "report.html").symlink_to("/dev/full")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"leakbench: cannot write {tmp_path / 'report.html'}: No space left on device\n"
    (tmp_path / "rows.csv").symlink_to("/dev/full")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "rows")]) == 2
    assert f"cannot write {tmp_path / 'rows.csv'}: No space left on device" in capsys.readouterr().err


def test_a_store_that_is_no_database_is_refused_by_every_command(config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.sqlite").write_text("a text file where the store belongs\n" * 50)
    for command in (["run", str(config), "--out", str(out), "--quiet"], ["report", str(out)], ["export", str(out)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{out / 'results.sqlite'} is not a result store: file is not a database" in err
        assert "Traceback" not in err
