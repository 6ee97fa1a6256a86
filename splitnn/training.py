"""Train a zoo model on a dataset with the one training loop (training defenses hook it, ``splitnn.hooks``), with a
checkpoint cache keyed by the hash of the training config and the fingerprint of the training code (a checkpoint
of other code is never loaded).

The device (``splitnn.devices``) is not part of the key: a model is initialised on the CPU (the same weights on
every device), moved to ``train``'s ``device``, trained there batch by batch, saved from a CPU copy and loaded
with ``map_location="cpu"``, so a checkpoint written on one device loads on another."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from leakbench.splitnn import datasets as datasets_mod
from leakbench.splitnn import devices, zoo
from leakbench.splitnn.errors import ParameterError, check_number
from leakbench.splitnn.faults import set_aside, write_failure
from leakbench.splitnn.fingerprint import code_fingerprint
from leakbench.splitnn.hooks import Recipe, TrainingHooks

CACHE_ENV = "LEAKBENCH_CACHE"


def default_cache_dir() -> Path:
    """``$LEAKBENCH_CACHE`` or ``~/.cache/leakbench``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "leakbench"))


def config_hash(config: dict[str, Any]) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_save(path: Path, write: Callable[[IO[bytes]], object]) -> None:
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
    #: What the training hooks are (e.g. ``{"name": "dp_sgd", "params": {...}}``), so hooked models get their own
    #: checkpoints; ``train`` then needs those hooks. None trains plainly. Built by the caller (``defenses``).
    defense: dict[str, Any] | None = None
    #: The cut, for hooks that act there (e.g. NoPeek); None otherwise.
    cut: str | None = None
    #: The user's weights, ``{"file": path, "sha256": digest}``: the model is loaded from them, never trained.
    weights: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_number("epochs", self.epochs, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("seed", self.seed, low=0, integer=True)
        if self.defense is not None and (not isinstance(self.defense, dict) or "name" not in self.defense
                                         or set(self.defense) - {"name", "params"}):
            raise ParameterError("defense", self.defense, "a mapping with 'name' and optional 'params'")

    def key(self) -> str:
        """The hash naming the checkpoint; ``defense``, ``cut`` and ``weights`` count only when set, so plain
        configs keep the hashes they had before those existed."""
        config = asdict(self)
        for optional in ("defense", "cut", "weights"):
            if config[optional] is None:
                del config[optional]
        return config_hash(config)

    def checkpoint_fingerprint(self, hooks: TrainingHooks | None = None) -> str:
        """The fingerprint of the code a checkpoint of this config comes from: the training loop (with the zoo
        and datasets it imports), the module of the training hooks, if any, and the module of the user's model
        factory, if the model is one (so editing the user's model code retrains it rather than reloading)."""
        from leakbench.splitnn.user_models import factory_module

        modules = [type(hooks).__module__] if hooks is not None else []
        user = factory_module(self.model)
        return code_fingerprint("leakbench.splitnn.training", *modules, *([user] if user else []))


@dataclass
class TrainedModel:
    model: nn.Module
    config: TrainConfig
    test_accuracy: float
    from_cache: bool
    path: Path | None
    train_seconds: float
    #: The training hooks that shaped the model (finished or restored: e.g. a defense with the epsilon spent).
    hooks: TrainingHooks | None = None


def build_model(config: TrainConfig, data: datasets_mod.Dataset) -> nn.Module:
    params = {"num_classes": data.num_classes, "in_channels": data.in_channels, **config.model_params}
    return zoo.get(config.model, **params)


class _Pairs(TorchDataset):
    """(image, label) pairs of images decoded on demand (``lazy_images``): a batch is decoded when the loader
    asks for it (``__getitems__``), so an epoch never holds more than a batch of images."""

    def __init__(self, x: Any, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.x[indices], self.y[indices]))


def pairs(x: Any, y: torch.Tensor) -> TorchDataset:
    """The training pairs of ``(x, y)``: a TensorDataset for a tensor, else pairs decoded batch by batch."""
    return TensorDataset(x, y) if isinstance(x, torch.Tensor) else _Pairs(x, y)


@torch.no_grad()
def accuracy(model: nn.Module, x: datasets_mod.Images, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``, ``batch_size`` images at a time (a lazy
    ``x`` is decoded a batch at a time), each batch moved to the model's device."""
    from torchmetrics.functional.classification import multiclass_accuracy

    model.eval()
    device = devices.of(model)
    logits = torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    return float(multiclass_accuracy(logits, y.to(device), num_classes=logits.shape[1], average="micro"))


#: A caller's own objective ``loss(model, x, y)`` in place of the cross-entropy of ``model(x)``.
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fit(model: nn.Module, x: datasets_mod.Images | Any, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
        weight_decay: float, seed: int, progress: bool = True, hooks: TrainingHooks | None = None,
        loss: Loss | None = None) -> dict[str, Any]:
    """The one loop: SGD with momentum and a cosine schedule over every step, deterministic given ``seed``;
    ``hooks`` may change the recipe (epochs, lr, batch size, weight decay: the loader and optimizer are built
    from theirs), wrap (model, optimizer, loader) and add a loss term. ``loss`` replaces the task loss (e.g. a
    shadow client under a frozen server); it excludes hooks. ``x`` is a tensor or anything that indexes like one
    (``lazy_images``: decoded a batch at a time, in the order a tensor's batches would come), on any device: each
    batch is moved to the model's device (``devices.of``) and the shuffle is drawn on the CPU, so it is the same
    on every device. Returns the hooks' report (``finish``); ``model`` itself is trained and left in eval mode."""
    if loss is not None and hooks is not None:
        raise ValueError("fit takes a replacement loss or training hooks, not both")
    hooks = hooks if hooks is not None else TrainingHooks()
    recipe = hooks.recipe(Recipe(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay))
    epochs = recipe.epochs
    loader = DataLoader(pairs(x, y), batch_size=recipe.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9,
                                                       weight_decay=recipe.weight_decay)
    model.train()
    device = devices.of(model)
    wrapped, optimizer, loader = hooks.wrap(model, optimizer, loader, epochs=epochs)
    # created after the wrap, so it schedules the optimizer that steps, over the steps the loader makes
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(loader)))
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            if loss is not None:
                total = loss(wrapped, xb, yb)
            else:
                outputs = wrapped(xb)
                extra = hooks.loss_term(wrapped, xb, yb, outputs)
                total = F.cross_entropy(outputs, yb) if extra is None else F.cross_entropy(outputs, yb) + extra
            total.backward()
            optimizer.step()
            schedule.step()
    report = hooks.finish(model)  # a failed training leaves the model to be discarded, hooks and all
    model.eval()
    return report


def train(config: TrainConfig, cache_dir: str | Path | None = None, *, hooks: TrainingHooks | None = None,
          data: datasets_mod.Dataset | None = None, progress: bool = True,
          device: str | torch.device = "cpu") -> TrainedModel:
    """Train ``config.model`` on ``config.dataset`` with the one loop (``fit``), or load it from the cache if
    it was trained before.

    ``hooks`` (e.g. a training defense) prepare the model (they may change the architecture, e.g. BatchNorm
    -> GroupNorm) and hook the loop; their report is kept with the checkpoint and restored from it. A config
    that names a defense needs its hooks, and hooks need a config that names them (their own checkpoint).
    The checkpoint is ``<cache_dir>/models/<config hash>-<code fingerprint>.pt`` (a state dict) with a JSON
    sidecar that records both; after a change in the training code or the package versions it retrains.
    The model is built on the CPU, then trained (or loaded) and returned on ``device``, which is no part of the key.
    """
    if (config.defense is None) != (hooks is None):
        raise ParameterError("hooks", hooks, f"training hooks for the defense the config names "
                             f"({config.defense['name']})" if config.defense is not None else
                             "None, or a config whose defense names these hooks (so they get their own checkpoint)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = data if data is not None else datasets_mod.get(config.dataset, **config.dataset_params)
    device = devices.use(device)
    if config.weights is not None:
        return _with_weights(config, data, hooks, device)

    def fresh_model() -> nn.Module:
        torch.manual_seed(config.seed)
        model = build_model(config, data)
        return hooks.prepare_model(model) if hooks is not None else model

    model = fresh_model()
    fingerprint = config.checkpoint_fingerprint(hooks)
    path = cache / "models" / f"{config.key()}-{fingerprint}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        try:  # everything read before the model is touched; a bad state dict rebuilds it below
            state = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(meta_path.read_text())
            test_accuracy, train_seconds = float(meta["test_accuracy"]), float(meta["train_seconds"])
            report = dict(meta.get("defense_report", {}))
            model.load_state_dict(state)
            model.to(device)
        except Exception as exc:  # a truncated, foreign or hand-edited file: moved aside (kept) and retrained
            set_aside(path, exc, meta_path)
            model = fresh_model()
        else:
            if hooks is not None:
                hooks.restore(report)
            return TrainedModel(model.eval(), config, test_accuracy, True, path, train_seconds, hooks)

    model.to(device)
    start = time.perf_counter()
    report = fit(model, data.x_train, data.y_train, epochs=config.epochs, lr=config.lr,
                 batch_size=config.batch_size, weight_decay=config.weight_decay, seed=config.seed,
                 progress=progress, hooks=hooks)
    seconds = time.perf_counter() - start
    acc = accuracy(model, data.x_test, data.y_test)
    meta = json.dumps({"config": asdict(config), "key": config.key(), "code_fingerprint": fingerprint,
                       "test_accuracy": acc, "train_seconds": seconds, "defense_report": report},
                      indent=2, default=str)
    atomic_save(path, lambda file: torch.save(cpu_state(model), file))  # the sidecar last: it marks done
    atomic_save(meta_path, lambda file: file.write(meta.encode()))
    return TrainedModel(model, config, acc, False, path, seconds, hooks)


def cpu_state(model: nn.Module) -> dict[str, Any]:
    """``model``'s state dict with every tensor on the CPU (the same dict, metadata and all, for a CPU model)."""
    state = model.state_dict()
    for name, tensor in state.items():
        state[name] = tensor.cpu()
    return state


def _with_weights(config: TrainConfig, data: datasets_mod.Dataset, hooks: TrainingHooks | None,
                  device: torch.device) -> TrainedModel:
    """The user's model with the user's weights (``config.weights``): built, loaded and scored, not trained."""
    from leakbench.splitnn.user_models import file_digest, load_weights

    assert config.weights is not None
    if hooks is not None:
        raise ParameterError("weights", config.weights["file"], "a model to train: a training defense "
                             f"({type(hooks).__name__}) shapes training, and a model with weights is not trained")
    file = config.weights["file"]
    if file_digest(file) != config.weights["sha256"]:
        raise ParameterError("weights", file, f"the file validated (SHA-256 {config.weights['sha256']}); it has "
                                              "changed since: validate the config again")
    torch.manual_seed(config.seed)
    model = load_weights(build_model(config, data), file).eval().to(device)
    return TrainedModel(model, config, accuracy(model, data.x_test, data.y_test), False, Path(file), 0.0, None)
