"""The matrix runner: runs every cell of a config, skipping cells the store already has done,
storing failures and inapplicable cells as rows instead of stopping.

Computing a cell (``Matrix.compute_cell``) is separate from storing it: an executor
(``evaluation.executors``) computes cells here or on Dask workers, and only the process that owns the
store writes it, one transaction per finished cell, as results arrive.

A cell runs on the config's device (``ExperimentConfig.device``, ``splitnn.devices``): the target model after
training or loading, the attacked images and their defended features, the fitted defense, the attack's context,
the metrics and the evaluation classifier live there; what is stored (rows, reconstructions) comes back to the
CPU. The device is not part of a cell's key (the run's provenance names it).
"""
from __future__ import annotations

import math
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, cast

import torch

from leakbench import attacks, defenses
from leakbench.attacks.base import BUDGET_KEYS, Reconstruction
from leakbench.attacks.peel import stage_input_errors
from leakbench.evaluation import chunks, dfil, provenance
from leakbench.evaluation.attack_context import attack_cache_key, attack_context, denied
from leakbench.evaluation.config import Cell, ExperimentConfig
from leakbench.evaluation.evaluators import Evaluators
from leakbench.evaluation.image_sets import attacked_indices
from leakbench.evaluation.memory import PeakMemory
from leakbench.evaluation.metrics import accuracy, image_metrics, summarize, worst_case
from leakbench.evaluation.store import ResultStore, row_fingerprint
from leakbench.splitnn import datasets, devices
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.faults import WriteFailure
from leakbench.splitnn.model import SplitModel
from leakbench.splitnn.progress import attack_progress
from leakbench.splitnn.split import split
from leakbench.splitnn.training import TrainedModel, config_hash, train

if TYPE_CHECKING:
    from leakbench.evaluation.executors import Executor


class NonFiniteFeatures(RuntimeError):
    """The features at the cut contain NaN or infinity."""


class NonFiniteReconstruction(RuntimeError):
    """An attack returned NaN or infinite images: the cell fails with that reason instead of NULL metrics."""


@dataclass
class RunSummary:
    """What a run did: cells by status, how many were recomputed (``stale``: stored by other code; ``forced``:
    ``--recompute``), and how often shared work came from a cache."""

    run_id: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    not_applicable: int = 0
    stale: int = 0
    forced: int = 0
    cache: Counter = field(default_factory=Counter)

    def counts_line(self) -> str:
        """E.g. ``4 done (2 recomputed: stored by other code), 2 already done, 0 failed, 0 not applicable``."""
        why = ", ".join(f"{n} recomputed: {what}" for n, what in ((self.stale, "stored by other code"),
                                                                   (self.forced, "--recompute")) if n)
        done = f"{self.done} done" + (f" ({why})" if why else "")
        return f"{done}, {self.skipped} already done, {self.failed} failed, {self.not_applicable} not applicable"

    def cache_line(self) -> str:
        """E.g. ``models 1 hit / 1 miss (1 from disk), features 3 hits / 3 misses``."""
        c = self.cache
        return (f"cache: models {c['model_hit']} hits / {c['model_miss']} misses "
                f"({c['model_disk']} of the misses loaded from disk), "
                f"defended features {c['features_hit']} hits / {c['features_miss']} misses")


@dataclass
class CellResult:
    """A computed cell, ready for ``ResultStore.write_cell``; ``cache`` counts this cell's cache use."""

    key: str
    config: dict[str, Any]
    status: str
    fields: dict[str, Any]
    cache: Counter = field(default_factory=Counter)


@dataclass
class Features:
    """What the cells sharing (model, cut, defense, seed, images) share: the attacked images (their test-set
    indices and labels), their defended features and the defended split model's accuracy."""

    truth: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    features: torch.Tensor
    accuracy: float


class Matrix:
    """Runs the cells of an ExperimentConfig into a ResultStore, sharing datasets, trained models and
    defended features between the cells that need the same ones (in this process)."""

    def __init__(self, config: ExperimentConfig, cache_dir: str | None = None, progress: bool = True):
        self.config = config
        self.cache_dir = cache_dir
        self.progress = progress
        self._data: dict[str, Dataset] = {}
        self._models: dict[str, TrainedModel] = {}
        self._fitted: dict[str, tuple[defenses.Defense, torch.nn.Module]] = {}
        self._features: dict[str, Features] = {}
        self._bounds: dict[str, dfil.Bound] = {}  # per features_key: the bound needs no attack
        self.cache_stats: Counter = Counter()
        self.device = torch.device(config.device)  # made ready (devices.use) when a cell starts: workers too
        self.evaluators = Evaluators(cache_dir, progress, self.device)  # the evaluation classifier, LPIPS

    def cells(self) -> list[Cell]:
        return self.config.cells()

    @property
    def config_key(self) -> str:
        """The hash of the config this Matrix runs (workers keep one Matrix per config)."""
        return config_hash({"name": self.config.name, "raw": self.config.raw})

    def for_workers(self) -> "Matrix":
        """A copy (of the same class) with empty caches and no progress bars, cheap to send to a worker."""
        return type(self)(self.config, cache_dir=self.cache_dir, progress=False)

    def dataset(self, cell: Cell) -> Dataset:
        key = repr((cell["dataset"]["name"], sorted(cell["dataset"]["params"].items())))
        if key not in self._data:
            self._data[key] = datasets.get(cell["dataset"]["name"], **cell["dataset"]["params"])
        return self._data[key]

    def trained(self, cell: Cell) -> TrainedModel:
        """The cell's trained model: from this process's cache, else the disk cache, else trained now."""
        config = cell.train_config()
        if config.key() in self._models:
            self.cache_stats["model_hit"] += 1
        else:
            self._models[config.key()] = train(config, self.cache_dir, hooks=defenses.hooks_for(config),
                                               data=self.dataset(cell), progress=self.progress, device=self.device)
            self.cache_stats["model_miss"] += 1
            self.cache_stats["model_disk"] += int(self._models[config.key()].from_cache)
        return self._models[config.key()]

    def defense(self, cell: Cell, trained: TrainedModel, client: torch.nn.Module,
                server: torch.nn.Module) -> tuple[defenses.Defense, torch.nn.Module]:
        """The cell's defense, ready to use, and the server half to use it with.

        A training defense is (a copy of) the instance that trained the model (it carries e.g. the epsilon spent),
        its random stream started again from its seed, as a transform defense's is.
        A transform defense that ``needs_fit`` is fitted once on the training data per (model, cut,
        defense, seed) and shared by the cells that differ only in the attack; each cell gets a copy
        whose random stream starts again from the seed.
        """
        spec = cell["defense"]
        if isinstance(trained.hooks, defenses.TrainingDefense):  # a copy whose random stream starts at its seed
            return trained.hooks.reseeded(), server
        defense = defenses.get(spec["name"], seed=cell["seed"], **spec["params"])
        if not defense.needs_fit:
            return defense, server
        key = config_hash({"model": trained.config.key(), "cut": cell["cut"], "defense": spec, "seed": cell["seed"]})
        if key not in self._fitted:
            data = self.dataset(cell)
            # needs_fit is a feature defense's (defenses.base)
            server = cast(defenses.FeatureDefense, defense).fit(client, server, data.x_train, data.y_train)
            server.eval()
            self._fitted[key] = (defense, server)
        fitted, server = self._fitted[key]
        return fitted.reseeded(), server

    @staticmethod
    def features_key(cell: Cell) -> str:
        """The cell minus its attack: cells with equal keys have the same defended features."""
        return config_hash({k: v for k, v in cell.config.items() if k != "attack"})

    def features(self, cell: Cell, client: torch.nn.Module, server: torch.nn.Module,
                 defense: defenses.Defense) -> Features:
        """The defended features of the cell's images and the defended model's accuracy, computed once
        per ``features_key`` in this process. ``defense`` is consumed (its random stream advances)."""
        key = self.features_key(cell)
        if key in self._features:
            self.cache_stats["features_hit"] += 1
            return self._features[key]
        self.cache_stats["features_miss"] += 1
        data = self.dataset(cell)
        indices = attacked_indices(data, cell["seed"], cell["evaluation"]["num_images"])
        truth = data.x_test[indices].to(self.device)
        with torch.no_grad():
            features = defense(client(truth))
        if not torch.isfinite(features).all():
            raise NonFiniteFeatures("the defended features contain NaN or infinity")
        utility = accuracy(SplitModel(client, server, defense), data.x_test, data.y_test)
        self._features[key] = Features(truth, data.y_test[indices], indices, features, utility)
        return self._features[key]

    def run(self, store: ResultStore, executor: "Executor | None" = None, recompute: Iterable[str] = ()
            ) -> RunSummary:
        """Compute every cell the store does not have as done or not applicable from the installed code (the
        same ``cell_fingerprint``), and every cell whose attack or defense ``recompute`` names; store each one
        as it arrives; a killed run loses at most the cells in flight."""
        from leakbench.evaluation.executors import Sequential

        forced = self.forced(recompute)  # a bad name fails before any work
        executor = executor or Sequential()
        cells = self.cells()
        run_id = store.start_run(self.config.raw, {**provenance.collect(devices.describe(self.config.device)),
                                                   "executor": executor.describe()})
        summary = RunSummary(run_id)
        pending = []
        fingerprints = {cell.key: self.cell_fingerprint(cell) for cell in cells}
        for cell in cells:
            status, stored = store.cell_state(cell.key)
            finished = status in ("done", "not_applicable")
            if cell.key in forced:
                summary.forced += 1
            elif finished and stored == fingerprints[cell.key]:
                summary.skipped += 1
                continue
            elif finished:
                summary.stale += 1
            pending.append(cell)
        for result in executor.map(self, pending):
            store.write_cell(result.key, run_id, result.config, result.status,
                             code_fingerprint=fingerprints[result.key], **result.fields)
            setattr(summary, result.status, getattr(summary, result.status) + 1)
            summary.cache.update(result.cache)
        store.finish_run(run_id)
        return summary

    @staticmethod
    def cell_fingerprint(cell: Cell) -> str | None:
        """The fingerprint of the code that computes ``cell`` now (``evaluation.store.row_fingerprint``)."""
        return row_fingerprint(cell.config)

    def forced(self, names: Iterable[str]) -> set[str]:
        """The keys of the cells whose attack or defense is one of ``names`` (``--recompute``); a name that is
        neither an attack nor a defense of this config raises ParameterError."""
        names = set(names)
        cells = self.cells()
        known = {c[part]["name"] for c in cells for part in ("attack", "defense")}
        for name in sorted(names - known):
            raise ParameterError("--recompute", name, f"an attack or defense of {self.config.name}: "
                                                      + ", ".join(sorted(known)))
        return {c.key for c in cells if c["attack"]["name"] in names or c["defense"]["name"] in names}

    def compute_cell(self, cell: Cell) -> CellResult:
        """Compute one cell without touching any store. Never raises for a failure inside the cell: it
        comes back as a ``failed`` result carrying the error and its traceback. A WriteFailure (e.g. a full disk
        under the checkpoint cache) is raised: the run stops there, keeping the cells stored before.

        ``peak_rss_mb`` is this cell's peak resident memory (``evaluation.memory.PeakMemory``, not the process's
        lifetime mark), with the extra columns ``peak_rss_rise_mb`` (that peak over the resident size at the
        cell's start) and, on CUDA, ``peak_cuda_mb``."""
        before = Counter(self.cache_stats)
        start = time.perf_counter()
        with PeakMemory() as memory:
            try:
                fields = self._compute(cell)
                status = fields.pop("status")
            except WriteFailure:  # a full disk or read-only cache: every later cell would meet it too
                raise
            except Exception as exc:  # one failing cell must not stop the others
                status = "failed"
                fields = {"reason": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"}
        fields.update(wall_time_s=time.perf_counter() - start, peak_rss_mb=memory.peak_rss_mb)
        fields["extra"] = {**fields.get("extra", {}), "peak_rss_rise_mb": memory.rise_mb,
                           **({"peak_cuda_mb": memory.peak_cuda_mb} if memory.peak_cuda_mb is not None else {})}
        used = Counter(self.cache_stats)
        used.subtract(before)
        return CellResult(cell.key, cell.config, status, fields, +used)

    def _compute(self, cell: Cell) -> dict[str, Any]:
        devices.use(self.device)  # deterministic algorithms on CUDA, before any CUDA work
        seed = cell["seed"]
        torch.manual_seed(seed)
        data = self.dataset(cell)
        trained = self.trained(cell)
        server: torch.nn.Module  # the traced half, then the one its defense goes with
        client, server = split(trained.model, cell["cut"])
        client.eval()
        server.eval()
        defense, server = self.defense(cell, trained, client, server)
        attack = attacks.get(cell["attack"]["name"], **cell["attack"]["params"])

        reason = denied(attack, defense)
        ok, reason = (False, reason) if reason else attack.supports(client, defense)
        if not ok:
            return {"status": "not_applicable", "reason": reason, "guarantee": defense.guarantee()}

        shared = self.features(cell, client, server, defense)
        # The attack sees a defense whose random stream starts at the seed and the same global RNG state
        # whether or not the features came from the cache, so a row does not depend on cell order.
        defense, server = self.defense(cell, trained, client, server)
        torch.manual_seed(seed)
        context = attack_context(attack, data=data, client=client, server=server, defense=defense, seed=seed,
                                 cache_dir=self.cache_dir, cache_key=attack_cache_key(
                                     attack, defense, cell["defense"],
                                     {"model": trained.config.key(), "cut": cell["cut"], "seed": seed}))
        with attack_progress(self.progress):  # bars inside the attack (splitnn.progress) and over its chunks
            recon = chunks.reconstruct(attack, client, shared.features, context,
                                       batch_size=cell["evaluation"].get("batch_size"), seed=seed)
        if not torch.isfinite(recon.images).all():
            raise NonFiniteReconstruction(f"{attack.name} returned NaN or infinite reconstructions")
        per_image = image_metrics(recon.images, shared.truth)
        judged, evaluation_note = self.evaluators.metrics(cell, data, recon.images, shared.truth, shared.labels)
        per_image.update(judged)
        # after the attack, at the true images: the least expected error of any unbiased attacker (evaluation.dfil)
        bound_key = self.features_key(cell)
        if bound_key not in self._bounds:
            self._bounds[bound_key] = dfil.bound(client, defense, shared.truth, seed=seed)
        fisher = self._bounds[bound_key]
        per_image.update(fisher.per_image())
        diagnostics = {"attack": recon.diagnostics, "defense": defense.report, "evaluation": evaluation_note,
                       "images": {"test_indices": shared.indices.tolist()}, "dfil": fisher.diagnostics(),
                       "model": {"test_accuracy_undefended": trained.test_accuracy,
                                 "from_cache": trained.from_cache, "checkpoint": str(trained.path)}}
        diagnostics["attack"].update(scored_against_truth(client, data.shape, recon, shared.truth))
        summary = {m: summarize(v, seed=seed) for m, v in per_image.items()}
        summary.update({m: (v, math.nan, math.nan) for m, v in worst_case(per_image).items()})
        spent = recon.diagnostics.get("budget", {})
        extra = {f"budget_{k}": spent.get(k) for k in BUDGET_KEYS if not k.endswith("_per_sample")}
        extra["evaluator"] = evaluation_note.get("evaluator")
        extra["dfil_method"] = fisher.method
        return {"status": "done", "accuracy": shared.accuracy, "per_image": per_image, "summary": summary,
                "reconstruction": recon.images.detach().cpu(), "guarantee": defense.guarantee(),
                "diagnostics": diagnostics,
                "extra": extra}


def scored_against_truth(client: torch.nn.Module, image_shape: tuple[int, int, int], recon: Reconstruction,
                         truth: torch.Tensor) -> dict[str, Any]:
    """What only the evaluator can compute, after the attack: the true error of each stage input an attack
    recovered (PEEL's chain) and the MSE of its block-wise image."""
    out: dict[str, Any] = {}
    if recon.intermediates:
        out["true_input_errors"] = stage_input_errors(client, image_shape, recon.intermediates, truth)
    if "blockwise" in recon.alternatives:
        out["blockwise_mse"] = float((recon.alternatives["blockwise"].double() - truth.double()).pow(2).mean())
    return out
