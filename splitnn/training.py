"""Train a zoo model on a dataset, with a checkpoint cache keyed by the hash of the training config and the
fingerprint of the training code (a checkpoint of other code is never loaded)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from splitnn import datasets as datasets_mod
from splitnn import zoo
from splitnn.errors import ParameterError, check_number
from splitnn.faults import set_aside, write_failure
from splitnn.fingerprint import code_fingerprint

if TYPE_CHECKING:
    from defenses.base import Defense

CACHE_ENV = "LEAKBENCH_CACHE"


def default_cache_dir() -> Path:
    """``$LEAKBENCH_CACHE`` or ``~/.cache/leakbench``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "leakbench"))


def config_hash(config: dict[str, Any]) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_save(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)``: into a unique temporary file beside it (``mkstemp``), fsynced,
    then renamed into place and the folder fsynced, so a killed run never leaves half a file and of concurrent
    writers one wins whole. Any OSError (e.g. a full disk) is raised as a WriteFailure naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failure(path, exc) from exc
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from exc
        raise


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model; its hash names the checkpoint."""

    model: str
    dataset: str
    model_params: dict[str, Any] = field(default_factory=dict)
    dataset_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 64
    weight_decay: float = 5e-4
    seed: int = 0
    #: A training defense as ``{"name": ..., "params": {...}}`` (e.g. dp_sgd, nopeek); None trains plainly.
    defense: dict[str, Any] | None = None
    #: The cut, for training defenses that act there (``uses_cut``, e.g. NoPeek); None otherwise.
    cut: str | None = None

    def __post_init__(self) -> None:
        check_number("epochs", self.epochs, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("seed", self.seed, low=0, integer=True)
        if self.defense is not None:
            if not isinstance(self.defense, dict) or set(self.defense) - {"name", "params"} \
                    or "name" not in self.defense:
                raise ParameterError("defense", self.defense, "a mapping with 'name' and optional 'params'")
            self.build_defense()  # a bad name, kind or parameter fails now, before any work

    def key(self) -> str:
        """The hash naming the checkpoint; ``defense`` and ``cut`` count only when set, so plain
        configs keep the hashes they had before training defenses existed."""
        config = asdict(self)
        for optional in ("defense", "cut"):
            if config[optional] is None:
                del config[optional]
        return config_hash(config)

    def checkpoint_fingerprint(self, defense: "Defense | None" = None) -> str:
        """The fingerprint of the code a checkpoint of this config comes from: the training loop (with the zoo
        and datasets it imports) and the training defense's module, if any (``defense``: the built one)."""
        defense = defense if defense is not None else self.build_defense()
        return code_fingerprint("splitnn.training", *([type(defense).__module__] if defense is not None else []))

    def build_defense(self) -> "Defense | None":
        """The training defense this config names, seeded with ``seed``; None when there is none."""
        if self.defense is None:
            return None
        import defenses

        defense = defenses.get(self.defense["name"], seed=self.seed, **self.defense.get("params", {}))
        if defense.kind != "training":
            raise ParameterError("defense.name", self.defense["name"],
                                 "a training defense (transform defenses act at inference, not in train())")
        if defense.uses_cut and self.cut is None:
            raise ParameterError("cut", None, f"the cut at which {defense.name} trains")
        return defense


@dataclass
class TrainedModel:
    model: nn.Module
    config: TrainConfig
    test_accuracy: float
    from_cache: bool
    path: Path | None
    train_seconds: float
    #: The training defense that shaped the model (with its ``report``, e.g. the epsilon spent), if any.
    defense: "Defense | None" = None


def build_model(config: TrainConfig, data: datasets_mod.Dataset) -> nn.Module:
    params = {"num_classes": data.num_classes, "in_channels": data.in_channels, **config.model_params}
    return zoo.get(config.model, **params)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``."""
    from torchmetrics.functional.classification import multiclass_accuracy

    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return float(multiclass_accuracy(logits, y, num_classes=logits.shape[1], average="micro"))


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task loss: cross-entropy of ``model(x)`` against ``y``."""
    return F.cross_entropy(model(x), y)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
        weight_decay: float, seed: int, progress: bool = True, loss: Loss = cross_entropy) -> nn.Module:
    """SGD with momentum and a cosine schedule; deterministic given ``seed``. ``loss(model, x, y)`` lets a
    training defense add a penalty (e.g. NoPeek's distance correlation at the cut)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * steps_per_epoch))
    model.train()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss(model, x[idx], y[idx]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train(config: TrainConfig, cache_dir: str | Path | None = None, *, data: datasets_mod.Dataset | None = None,
          progress: bool = True) -> TrainedModel:
    """Train ``config.model`` on ``config.dataset``, or load it from the cache if it was trained before.

    With a training defense (``config.defense``) the defense prepares the model (it may change the
    architecture, e.g. BatchNorm -> GroupNorm) and trains it; its report is kept with the checkpoint.
    The checkpoint is ``<cache_dir>/models/<config hash>-<code fingerprint>.pt`` (a state dict) with a JSON
    sidecar that records both; after a change in the training code or the package versions it retrains.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = data if data is not None else datasets_mod.get(config.dataset, **config.dataset_params)
    defense = config.build_defense()
    torch.manual_seed(config.seed)
    model = build_model(config, data)
    if defense is not None:
        model = defense.prepare_model(model)
    fingerprint = config.checkpoint_fingerprint(defense)
    path = cache / "models" / f"{config.key()}-{fingerprint}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        try:  # everything read before the model is touched; a bad state dict rebuilds it below
            state = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(meta_path.read_text())
            test_accuracy, train_seconds = float(meta["test_accuracy"]), float(meta["train_seconds"])
            model.load_state_dict(state)
            if defense is not None:
                defense.restore(meta.get("defense_report", {}))
        except Exception as exc:  # a truncated, foreign or hand-edited file: moved aside (kept) and retrained
            set_aside(path, exc, meta_path)
            defense = config.build_defense()
            torch.manual_seed(config.seed)
            model = build_model(config, data)
            if defense is not None:
                model = defense.prepare_model(model)
        else:
            return TrainedModel(model.eval(), config, test_accuracy, True, path, train_seconds, defense)

    start = time.perf_counter()
    report: dict[str, Any] = {}
    if defense is None:
        fit(model, data.x_train, data.y_train, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
            weight_decay=config.weight_decay, seed=config.seed, progress=progress)
    else:
        report = defense.train_model(model, data.x_train, data.y_train, config, cut=config.cut, progress=progress)
        defense.restore(report)
        model.eval()
    seconds = time.perf_counter() - start
    acc = accuracy(model, data.x_test, data.y_test)
    meta = json.dumps({"config": asdict(config), "key": config.key(), "code_fingerprint": fingerprint,
                       "test_accuracy": acc, "train_seconds": seconds, "defense_report": report},
                      indent=2, default=str)
    atomic_save(path, lambda file: torch.save(model.state_dict(), file))  # the sidecar last: it marks done
    atomic_save(meta_path, lambda file: file.write(meta.encode()))
    return TrainedModel(model, config, acc, False, path, seconds, defense)
