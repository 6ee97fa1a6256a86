"""The matrix runner: runs every cell of a config, skipping cells the store already has done,
storing failures and inapplicable cells as rows instead of stopping."""
from __future__ import annotations

import copy
import resource
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import attacks
import defenses
from evaluation import provenance
from evaluation.config import Cell, ExperimentConfig
from evaluation.metrics import accuracy, image_metrics, summarize
from evaluation.store import ResultStore
from splitnn import datasets
from splitnn.datasets import Dataset
from splitnn.model import SplitModel
from splitnn.split import split
from splitnn.training import TrainedModel, config_hash, train


class NonFiniteFeatures(RuntimeError):
    """The features at the cut contain NaN or infinity."""


@dataclass
class RunSummary:
    run_id: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    not_applicable: int = 0


class Matrix:
    """Runs the cells of an ExperimentConfig into a ResultStore, sharing datasets and trained models."""

    def __init__(self, config: ExperimentConfig, cache_dir: str | None = None, progress: bool = True):
        self.config = config
        self.cache_dir = cache_dir
        self.progress = progress
        self._data: dict[str, Dataset] = {}
        self._models: dict[str, TrainedModel] = {}
        self._fitted: dict[str, tuple[defenses.Defense, torch.nn.Module]] = {}

    def cells(self) -> list[Cell]:
        return self.config.cells()

    def dataset(self, cell: Cell) -> Dataset:
        key = repr((cell["dataset"]["name"], sorted(cell["dataset"]["params"].items())))
        if key not in self._data:
            self._data[key] = datasets.get(cell["dataset"]["name"], **cell["dataset"]["params"])
        return self._data[key]

    def trained(self, cell: Cell) -> TrainedModel:
        config = cell.train_config()
        if config.key() not in self._models:
            self._models[config.key()] = train(config, self.cache_dir, data=self.dataset(cell),
                                               progress=self.progress)
        return self._models[config.key()]

    def defense(self, cell: Cell, trained: TrainedModel, client: torch.nn.Module,
                server: torch.nn.Module) -> tuple[defenses.Defense, torch.nn.Module]:
        """The cell's defense, ready to use, and the server half to use it with.

        A training defense is the instance that trained the model (it carries e.g. the epsilon spent).
        A transform defense that ``needs_fit`` is fitted once on the training data per (model, cut,
        defense, seed) and shared by the cells that differ only in the attack; each cell gets a copy
        whose random stream starts again from the seed.
        """
        spec = cell["defense"]
        if trained.defense is not None:
            return trained.defense, server
        defense = defenses.get(spec["name"], seed=cell["seed"], **spec["params"])
        if not defense.needs_fit:
            return defense, server
        key = config_hash({"model": trained.config.key(), "cut": cell["cut"], "defense": spec, "seed": cell["seed"]})
        if key not in self._fitted:
            data = self.dataset(cell)
            server = defense.fit(client, server, data.x_train, data.y_train)
            server.eval()
            self._fitted[key] = (defense, server)
        fitted, server = self._fitted[key]
        fresh = copy.deepcopy(fitted)
        fresh._generator = None
        return fresh, server

    def run(self, store: ResultStore) -> RunSummary:
        cells = self.cells()
        run_id = store.start_run(self.config.raw, provenance.collect())
        summary = RunSummary(run_id)
        bar = tqdm(cells, desc=f"cells of {self.config.name}", unit="cell", disable=not self.progress)
        for cell in bar:
            bar.set_postfix_str(cell.label(), refresh=False)
            if store.status(cell.key) in ("done", "not_applicable"):
                summary.skipped += 1
                continue
            status = self.run_cell(cell, store, run_id)
            setattr(summary, status, getattr(summary, status) + 1)
        store.finish_run(run_id)
        return summary

    def run_cell(self, cell: Cell, store: ResultStore, run_id: str) -> str:
        """Run one cell and store it; returns its status. Never raises for a failure inside the cell."""
        start = time.perf_counter()
        try:
            result = self._compute(cell)
        except Exception as exc:  # one failing cell must not stop the others
            store.write_cell(cell.key, run_id, cell.config, "failed",
                             reason=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}",
                             wall_time_s=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb())
            return "failed"
        status = result.pop("status")
        store.write_cell(cell.key, run_id, cell.config, status,
                         wall_time_s=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(), **result)
        return status

    def _compute(self, cell: Cell) -> dict[str, Any]:
        seed = cell["seed"]
        torch.manual_seed(seed)
        data = self.dataset(cell)
        trained = self.trained(cell)
        client, server = split(trained.model, cell["cut"])
        client.eval()
        server.eval()
        defense, server = self.defense(cell, trained, client, server)
        attack = attacks.get(cell["attack"]["name"], **cell["attack"]["params"])

        ok, reason = attack.supports(client, defense)
        if not ok:
            return {"status": "not_applicable", "reason": reason, "guarantee": defense.guarantee()}

        truth = data.x_test[: cell["evaluation"]["num_images"]]
        with torch.no_grad():
            features = defense(client(truth))
        if not torch.isfinite(features).all():
            raise NonFiniteFeatures("the defended features contain NaN or infinity")
        utility = accuracy(SplitModel(client, server, defense), data.x_test, data.y_test)

        recon = attack.reconstruct(client, features, image_shape=data.shape, defense=defense, truth=truth)
        per_image = image_metrics(recon.images, truth)
        return {"status": "done", "accuracy": utility, "per_image": per_image,
                "summary": {m: summarize(v, seed=seed) for m, v in per_image.items()},
                "reconstruction": recon.images, "guarantee": defense.guarantee(),
                "diagnostics": {"attack": recon.diagnostics, "defense": defense.report,
                                "model": {"test_accuracy_undefended": trained.test_accuracy,
                                          "from_cache": trained.from_cache, "checkpoint": str(trained.path)}}}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
