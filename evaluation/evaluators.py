"""The metrics beyond pixels that a cell's ``evaluation:`` asks for: the evaluation classifier's (attack
accuracy, KNN distance) and LPIPS. Each judge is built once per process and shared by the cells that need
the same one, like trained models in the Matrix."""
from __future__ import annotations

from typing import Any

import torch

from evaluation.config import Cell
from evaluation.eval_classifier import EvaluationClassifier, evaluation_architecture, get_evaluation_classifier
from evaluation.perceptual import LPIPS, LPIPS_UNAVAILABLE
from splitnn.datasets import Dataset
from splitnn.training import TrainConfig, config_hash


class Evaluators:
    """Evaluation classifiers (per dataset, target architecture and training recipe) and LPIPS (per weights)."""

    def __init__(self, cache_dir: str | None = None, progress: bool = False):
        self.cache_dir = cache_dir
        self.progress = progress
        self._classifiers: dict[str, EvaluationClassifier] = {}
        self._lpips: dict[tuple[str, str], LPIPS] = {}

    @staticmethod
    def train_params(cell: Cell) -> dict[str, Any]:
        """The recipe of the cell's evaluation classifier: the target's, except that an untrained target
        (``epochs: 0``, random weights) still gets a trained judge (TrainConfig's default epochs)."""
        params = dict(cell["train"])
        if params.get("epochs") == 0:
            params["epochs"] = TrainConfig.__dataclass_fields__["epochs"].default
        return params

    @classmethod
    def classifier_key(cls, cell: Cell) -> str:
        """Cells with equal keys share one evaluation classifier."""
        return config_hash({"dataset": cell["dataset"], "target": cell["model"]["name"],
                            "train": cls.train_params(cell)})

    def classifier(self, cell: Cell, data: Dataset) -> EvaluationClassifier:
        """The cell's evaluation classifier, trained with the target's recipe (or loaded from the cache)."""
        key = self.classifier_key(cell)
        if key not in self._classifiers:
            self._classifiers[key] = get_evaluation_classifier(data, self.cache_dir, cell["model"]["name"],
                                                               self.progress, train_params=self.train_params(cell))
        return self._classifiers[key]

    def lpips(self, weights: str, net: str) -> LPIPS:
        if (weights, net) not in self._lpips:
            self._lpips[(weights, net)] = LPIPS(weights, net)
        return self._lpips[(weights, net)]

    def metrics(self, cell: Cell, data: Dataset, images: torch.Tensor,
                truth: torch.Tensor) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Per-image metrics of the reconstructions ``images`` of ``truth`` (the first test images), and a
        note for the diagnostics: which judge was used and why a metric is missing."""
        ev = cell["evaluation"]
        per_image: dict[str, list[float]] = {}
        note: dict[str, Any] = {"unavailable": {}}
        if ev["classifier"]:
            judge = self.classifier(cell, data)
            per_image.update(judge.classifier_metrics(images, data.y_test[:len(images)]))
            note["classifier"] = {"model": evaluation_architecture(cell["model"]["name"]),
                                  "test_accuracy": judge.test_accuracy}
        else:
            note["unavailable"]["attack_top1"] = "evaluation.classifier is false"
        if ev["lpips_weights"]:
            per_image["lpips"] = self.lpips(ev["lpips_weights"], ev["lpips_net"])(images, truth)
        else:
            note["unavailable"]["lpips"] = LPIPS_UNAVAILABLE
        return per_image, note
