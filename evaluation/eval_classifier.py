"""The evaluation classifier: one judge per dataset, trained apart from every target, that scores
reconstructions as the field does (does it recognise them? how far are they, in its feature space, from
the real training images of their class?).

Its architecture, seed and recipe are fixed (``EVALUATION_ARCHITECTURE``, ``EVALUATION_SEED``,
``EVALUATION_RECIPE``), never taken from the target, so every row of a table on one dataset is scored by
the same judge and their attack accuracy and KNN distance are comparable. A target that is itself a
ResNet-32 is judged by a ResNet-32 too, but never by itself: the judge's seed (1000) is not a target seed.
It is trained through ``splitnn.train``, so the checkpoint cache keeps it like any target model.

The user may bring their own judge instead (``evaluation: {classifier: {factory: ..., weights: FILE}}``, e.g. a
face-identity network for identity-level attack accuracy): ``load_evaluation_classifier`` loads it through the
same path as a target model with the user's weights (``splitnn.train`` with ``TrainConfig.weights``: checked,
never trained), and its embedding is likewise the input of its last ``nn.Linear``.

Either judge scores on the device it was trained or loaded on (``device``): images and labels are moved to it
batch by batch, and the scores come back as Python floats.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from leakbench.evaluation.metrics import IMAGE_METRICS
from leakbench.splitnn import devices
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.errors import check_number
from leakbench.splitnn.lazy_images import Images
from leakbench.splitnn.training import TrainConfig, train

#: The seed of every evaluation classifier (the targets use the config's seeds, 0 by default).
EVALUATION_SEED = 1000
#: The architecture of every evaluation classifier, whatever the target.
EVALUATION_ARCHITECTURE = "resnet32"
#: The judge's training recipe, independent of any cell's ``train:`` section (untrained targets included).
#: It is the recipe of the shipped configs, so their judges' checkpoints stay cached.
EVALUATION_RECIPE: dict[str, Any] = {"epochs": 10, "lr": 0.05, "batch_size": 64, "weight_decay": 5e-4}
#: Per-image metrics of ``EvaluationClassifier.classifier_metrics``, and whether higher means more leakage.
CLASSIFIER_METRICS: dict[str, bool] = {k: IMAGE_METRICS[k] for k in ("attack_top1", "attack_top5", "knn_distance")}

__all__ = ["EvaluationClassifier", "get_evaluation_classifier", "load_evaluation_classifier", "weights_digest",
           "last_linear", "CLASSIFIER_METRICS", "EVALUATION_ARCHITECTURE", "EVALUATION_RECIPE", "EVALUATION_SEED"]


def weights_digest(model: nn.Module) -> str:
    """sha256 (16 hex digits) of a model's state dict, names, dtypes, shapes and values: two judges with
    equal digests score alike, whichever machine trained them."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier's head: its last ``nn.Linear``, whose input is the judge's embedding."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no nn.Linear head whose input could serve as the embedding")
    return linears[-1]


class EvaluationClassifier:
    """A trained classifier with its penultimate embedding and the training set's embeddings per class."""

    def __init__(self, model: nn.Module, data: Dataset, batch_size: int = 256, test_accuracy: float | None = None,
                 architecture: str = "model", seed: int | None = None, checkpoint: str | None = None,
                 weights_file: dict[str, Any] | None = None):
        self.model = model.eval()
        self.num_classes = data.num_classes
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.test_accuracy = test_accuracy
        self.architecture = architecture
        self.seed = seed
        #: The name of its checkpoint in the cache (from ``TrainConfig.key()``), when it came from ``train``.
        self.checkpoint = checkpoint
        #: The user's weights file, ``{"file": path, "sha256": digest}``, when the judge came from one.
        self.weights_file = weights_file
        self.weights = weights_digest(model)
        self._head = last_linear(model)
        # Computed once: every reconstruction of every cell is compared with the same training embeddings.
        self._train_embeddings = self.embed(data.x_train)
        self._train_labels = data.y_train.clone().to(devices.of(self.model))

    @property
    def identity(self) -> str:
        """Names the judge in a row, e.g. ``"resnet32 seed 1000 weights 3f9c..."`` (the user's judge:
        ``"torchvision:resnet18(num_classes=5) weights 81a0..."``): rows with equal identities were scored by the
        same weights."""
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.architecture}{seed} weights {self.weights}"

    @torch.no_grad()
    def _forward(self, x: Images) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the head's input (the penultimate features), batch by batch (images decoded on demand
        are decoded a batch at a time; only the logits and embeddings are kept whole)."""
        logits, embeddings = [], []
        captured: list[torch.Tensor] = []
        hook = self._head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        device = devices.of(self.model)
        try:
            for i in range(0, len(x), self.batch_size):
                logits.append(self.model(x[i:i + self.batch_size].to(device).float()))
                embeddings.append(captured.pop().flatten(1))
        finally:
            hook.remove()
        return torch.cat(logits), torch.cat(embeddings)

    def logits(self, x: Images) -> torch.Tensor:
        """Class scores (N, num_classes) of images (N, C, H, W) in [0, 1]."""
        return self._forward(x)[0]

    def embed(self, x: Images) -> torch.Tensor:
        """Penultimate features (N, D): the input of the classifier's final linear layer."""
        return self._forward(x)[1]

    def classifier_metrics(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
        """Per image: ``attack_top1``/``attack_top5`` (1.0 when the true label is the top/among the top-5
        predictions) and ``knn_distance`` (squared L2 to the nearest training embedding of the true class)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        logits, embeddings = self._forward(images.detach().clamp(0, 1))
        labels = labels.to(logits.device)
        k = min(5, self.num_classes)
        top = logits.topk(k, dim=1).indices
        top1 = (top[:, 0] == labels).float()
        top5 = (top == labels[:, None]).any(dim=1).float()
        knn = []
        for embedding, label in zip(embeddings, labels):
            same_class = self._train_embeddings[self._train_labels == label]
            if len(same_class) == 0:
                knn.append(float("nan"))
                continue
            # Exact differences (not the matmul expansion) so an image from the training set scores 0.
            knn.append(float((same_class - embedding).pow(2).sum(dim=1).min()))
        return {"attack_top1": top1.tolist(), "attack_top5": top5.tolist(), "knn_distance": knn}


def get_evaluation_classifier(data: Dataset, cache_dir: str | None = None, progress: bool = False, *,
                              train_params: dict[str, Any] | None = None, model: str = EVALUATION_ARCHITECTURE,
                              device: str | torch.device = "cpu") -> EvaluationClassifier:
    """The evaluation classifier for ``data``: ``model`` with seed ``EVALUATION_SEED``, trained on ``data``'s
    training split with ``EVALUATION_RECIPE`` (``train_params`` overrides its keys: cheaper judges in
    tests), or loaded from the checkpoint cache, on ``device``. It depends on nothing but the dataset, by design
    (the device is not part of its checkpoint's key)."""
    recipe = {**EVALUATION_RECIPE, **(train_params or {})}
    config = TrainConfig(model=model, dataset=data.name, dataset_params=dict(data.params), seed=EVALUATION_SEED,
                         **recipe)
    trained = train(config, cache_dir, data=data, progress=progress, device=device)
    return EvaluationClassifier(trained.model, data, test_accuracy=trained.test_accuracy,
                                architecture=model, seed=EVALUATION_SEED,
                                checkpoint=trained.path.stem if trained.path is not None else config.key())


def load_evaluation_classifier(data: Dataset, judge: dict[str, Any], device: str | torch.device = "cpu"
                               ) -> EvaluationClassifier:
    """The user's evaluation classifier for ``data``: ``judge`` is the cell's resolved entry (``{"name", "params",
    "weights": {"file", "sha256"}}``, checked by the config), built and loaded from its weights, never trained;
    a weights file changed since validation raises ParameterError. It scores on ``device``."""
    params = dict(judge["params"])
    config = TrainConfig(model=judge["name"], dataset=data.name, model_params=params,
                         dataset_params=dict(data.params), seed=EVALUATION_SEED, weights=dict(judge["weights"]))
    loaded = train(config, data=data, progress=False, device=device)
    label = f"{judge['name']}({', '.join(f'{k}={v}' for k, v in params.items())})" if params else judge["name"]
    return EvaluationClassifier(loaded.model, data, test_accuracy=loaded.test_accuracy, architecture=label,
                                weights_file=dict(judge["weights"]))
