"""The evaluation classifier: a second model, of another architecture and seed than the target, that
scores reconstructions as the field does (does it recognise them? how far are they, in its feature space,
from the real training images of their class?).

It is trained once per (dataset, architecture, seed, recipe) through ``splitnn.train``, so the
checkpoint cache keeps it like any target model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evaluation.metrics import IMAGE_METRICS
from splitnn.datasets import Dataset
from splitnn.errors import check_number
from splitnn.training import TrainConfig, train

#: The seed of every evaluation classifier (the targets use the config's seeds, 0 by default).
EVALUATION_SEED = 1000
#: The evaluation architecture per target architecture; any other target gets DEFAULT_ARCHITECTURE.
ARCHITECTURES = {"resnet32": "resnet20"}
DEFAULT_ARCHITECTURE = "resnet32"
#: Per-image metrics of ``EvaluationClassifier.classifier_metrics``, and whether higher means more leakage.
CLASSIFIER_METRICS: dict[str, bool] = {k: IMAGE_METRICS[k] for k in ("attack_top1", "attack_top5", "knn_distance")}

__all__ = ["EvaluationClassifier", "get_evaluation_classifier", "evaluation_architecture", "CLASSIFIER_METRICS",
           "EVALUATION_SEED"]


def evaluation_architecture(target_model: str | None) -> str:
    """The architecture that judges reconstructions of ``target_model``: never the target's own."""
    return ARCHITECTURES.get(target_model or "", DEFAULT_ARCHITECTURE)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no nn.Linear head whose input could serve as the embedding")
    return linears[-1]


class EvaluationClassifier:
    """A trained classifier with its penultimate embedding and the training set's embeddings per class."""

    def __init__(self, model: nn.Module, data: Dataset, batch_size: int = 256, test_accuracy: float | None = None):
        self.model = model.eval()
        self.num_classes = data.num_classes
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.test_accuracy = test_accuracy
        self._head = _last_linear(model)
        # Computed once: every reconstruction of every cell is compared with the same training embeddings.
        self._train_embeddings = self.embed(data.x_train)
        self._train_labels = data.y_train.clone()

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the head's input (the penultimate features), batch by batch."""
        logits, embeddings = [], []
        captured: list[torch.Tensor] = []
        hook = self._head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            for i in range(0, len(x), self.batch_size):
                logits.append(self.model(x[i:i + self.batch_size].float()))
                embeddings.append(captured.pop().flatten(1))
        finally:
            hook.remove()
        return torch.cat(logits), torch.cat(embeddings)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes) of images (N, C, H, W) in [0, 1]."""
        return self._forward(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
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


def get_evaluation_classifier(data: Dataset, cache_dir: str | None = None, target_model: str | None = None,
                              progress: bool = False, *, train_params: dict[str, Any] | None = None,
                              model: str | None = None) -> EvaluationClassifier:
    """The evaluation classifier for ``data``: ``model`` (default: an architecture other than
    ``target_model``) with seed ``EVALUATION_SEED``, trained on ``data``'s training split with
    ``train_params`` (epochs, lr, batch_size, weight_decay; TrainConfig's defaults when None), or loaded
    from the checkpoint cache."""
    arch = model or evaluation_architecture(target_model)
    if target_model is not None and arch == target_model:
        raise ValueError(f"the evaluation classifier must differ from the target architecture ({target_model})")
    config = TrainConfig(model=arch, dataset=data.name, dataset_params=dict(data.params), seed=EVALUATION_SEED,
                         **(train_params or {}))
    trained = train(config, cache_dir, data=data, progress=progress)
    return EvaluationClassifier(trained.model, data, test_accuracy=trained.test_accuracy)
