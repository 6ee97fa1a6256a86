"""Where cells are computed: here, one after another (``Sequential``), or on a Dask cluster (``Dask``).

An executor only computes: ``map(matrix, cells)`` yields a ``CellResult`` per cell as each finishes, and
the caller (``Matrix.run``, in the one process that owns the result store) writes it. A cell that fails
on a worker, or whose worker dies, comes back as a ``failed`` result; it never stops the others.
"""
from __future__ import annotations

import os
import traceback
from collections import Counter
from typing import TYPE_CHECKING, Iterator, Protocol

from tqdm.auto import tqdm

from leakbench.evaluation.config import Cell
from leakbench.evaluation.evaluators import Evaluators
from leakbench.splitnn.faults import WriteFailure

if TYPE_CHECKING:
    from leakbench.evaluation.runner import CellResult, Matrix


class Executor(Protocol):
    """Computes cells of a Matrix and yields their results as they finish."""

    def describe(self) -> str:
        """A short description for the run's provenance, e.g. ``sequential`` or ``dask tcp://...``."""
        ...

    def map(self, matrix: "Matrix", cells: list[Cell]) -> Iterator["CellResult"]:
        ...


def _bar(matrix: "Matrix", total: int) -> tqdm:
    return tqdm(total=total, desc=f"cells of {matrix.config.name}", unit="cell", disable=not matrix.progress)


class Sequential:
    """Computes the cells in this process, in grid order, sharing the Matrix's in-process caches."""

    def describe(self) -> str:
        return "sequential"

    def map(self, matrix: "Matrix", cells: list[Cell]) -> Iterator["CellResult"]:
        with _bar(matrix, len(cells)) as bar:
            for cell in cells:
                bar.set_postfix_str(cell.label(), refresh=False)
                result = matrix.compute_cell(cell)
                bar.update()
                yield result


# -- Dask ---------------------------------------------------------------------------------------------
#: One Matrix per worker process and config, so a worker's cells share its trained models and features.
_WORKER_MATRICES: dict[tuple[str, str | None], "Matrix"] = {}


def _worker_matrix(matrix: "Matrix") -> "Matrix":
    """This worker's long-lived Matrix for ``matrix``'s config (the shipped one is a fresh copy per task)."""
    import torch

    torch.set_num_threads(1)  # one torch thread per worker: the workers share the machine's cores
    key = (matrix.config_key, matrix.cache_dir)
    if key not in _WORKER_MATRICES:
        matrix.progress = False
        _WORKER_MATRICES[key] = matrix
    return _WORKER_MATRICES[key]


def _train_on_worker(matrix: "Matrix", cell: Cell) -> None:
    """Train (or load) the cell's model, so the checkpoint is on disk before the cells that need it run."""
    _worker_matrix(matrix).trained(cell)


def _judge_on_worker(matrix: "Matrix", cell: Cell) -> None:
    """Train (or load) the cell's evaluation classifier, once, before the cells that use it run."""
    worker = _worker_matrix(matrix)
    worker.evaluators.classifier(cell, worker.dataset(cell))


def _compute_on_worker(matrix: "Matrix", cell: Cell) -> "CellResult":
    return _worker_matrix(matrix).compute_cell(cell)


class Dask:
    """Computes cells on a ``dask.distributed`` cluster: ``"local"`` starts a LocalCluster on this machine
    (loopback only; ``workers`` processes with one thread each), anything else is the address of a
    running scheduler (e.g. one started by dask-jobqueue). Workers must see the model cache directory
    (``--cache-dir``) on a shared filesystem to reuse checkpoints; otherwise each one trains its own.

    Each distinct trained model (and evaluation classifier) is first trained by one task, so workers do not
    train the same model twice at once; then every cell is one task, and results are yielded in the order they complete.
    A model or judge that fails to train fails the cells that need it (the reason names the error); the rest go on.
    """

    def __init__(self, address: str = "local", workers: int = 2):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer of at least 1, got {workers!r}")
        self.address = address
        self.workers = workers

    def describe(self) -> str:
        return f"dask {self.address}" + (f" ({self.workers} workers x 1 thread)" if self.address == "local" else "")

    def _client(self):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("the Dask executor needs dask and distributed: pip install 'dask[distributed]'") \
                from exc
        if self.address == "local":
            # Workers inherit this environment; one BLAS/OpenMP thread each as well as one torch thread.
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None)
            return Client(cluster), cluster
        return Client(self.address), None

    @staticmethod
    def _prepare(client, remote, by_model: dict[str, Cell], by_judge: dict[str, Cell]) -> dict[tuple[str, str], str]:
        """Train each model and judge once, up front; returns the reason of each one that failed, by
        ``("model" | "judge", key)`` (a WriteFailure, e.g. a full disk, is raised: it stops the run)."""
        from dask.distributed import wait

        tasks = {("model", key): client.submit(_train_on_worker, remote, cell, pure=False)
                 for key, cell in by_model.items()}
        tasks.update({("judge", key): client.submit(_judge_on_worker, remote, cell, pure=False)
                      for key, cell in by_judge.items()})
        wait(list(tasks.values()))
        problems = {}
        for (kind, key), future in tasks.items():
            if future.status == "finished":
                continue
            exc = future.exception() if future.status == "error" else RuntimeError(f"the task was {future.status}")
            if isinstance(exc, WriteFailure):
                raise exc
            what = "its model" if kind == "model" else "its evaluation classifier"
            text = "".join(traceback.format_exception(exc, limit=8))
            problems[kind, key] = f"training {what} on a Dask worker failed: {type(exc).__name__}: {exc}\n{text}"
        return problems

    def map(self, matrix: "Matrix", cells: list[Cell]) -> Iterator["CellResult"]:
        from dask.distributed import as_completed

        from leakbench.evaluation.runner import CellResult

        if not cells:
            return
        client, cluster = self._client()
        try:
            shipped = matrix.for_workers()
            remote = client.scatter(shipped, broadcast=True)
            by_model = {cell.train_config().key(): cell for cell in cells}
            by_judge = {Evaluators.classifier_key(cell): cell for cell in cells if cell["evaluation"]["classifier"]}
            problems = self._prepare(client, remote, by_model, by_judge)
            ready = []
            for cell in cells:  # a model (or judge) that failed to train fails its cells; the others go on
                why = problems.get(("model", cell.train_config().key())) or (
                    problems.get(("judge", Evaluators.classifier_key(cell))) if cell["evaluation"]["classifier"]
                    else None)
                if why is None:
                    ready.append(cell)
                else:
                    yield CellResult(cell.key, cell.config, "failed", {"reason": why}, Counter())
            futures = {client.submit(_compute_on_worker, remote, cell, pure=False): cell for cell in ready}
            with _bar(matrix, len(ready)) as bar:
                for future in as_completed(futures):
                    cell = futures[future]
                    try:
                        result = future.result()
                    except WriteFailure:  # a full disk or read-only cache on a worker: stop, as here
                        raise
                    except Exception as exc:  # the task itself failed (a worker died, unpicklable result)
                        text = "".join(traceback.format_exception(exc, limit=8))
                        result = CellResult(cell.key, cell.config, "failed",
                                            {"reason": f"{type(exc).__name__} on a Dask worker: {exc}\n{text}"},
                                            Counter())
                    bar.set_postfix_str(cell.label(), refresh=False)
                    bar.update()
                    yield result
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def from_option(dask: str | None, workers: int = 2) -> Executor:
    """The executor a ``--dask`` option names: none -> Sequential, ``local`` or an address -> Dask."""
    return Sequential() if not dask else Dask(dask, workers)
