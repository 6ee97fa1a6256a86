"""The metrics beyond pixels that a cell's ``evaluation:`` asks for: the evaluation classifier's (attack
accuracy, KNN distance) and LPIPS. Each judge is built once per process and shared by the cells that need
the same one, like trained models in the Matrix. The classifier depends on the dataset alone, so every row
of a table on one dataset is scored by the same judge, which the row names. The user's own judge
(``evaluation.classifier``, a model entry with weights) is loaded, never trained, and is part of what
identifies the classifier. The judges run on the cells' device (``device``; never part of a key)."""
from __future__ import annotations

from typing import Any

import torch

from leakbench.evaluation.config import Cell
from leakbench.evaluation.eval_classifier import (EvaluationClassifier, get_evaluation_classifier,
                                                  load_evaluation_classifier)
from leakbench.evaluation.perceptual import LPIPS, LPIPS_UNAVAILABLE
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.training import config_hash


class Evaluators:
    """Evaluation classifiers (one per dataset and its parameters) and LPIPS (per weights)."""

    def __init__(self, cache_dir: str | None = None, progress: bool = False, device: str | torch.device = "cpu"):
        self.cache_dir = cache_dir
        self.progress = progress
        self.device = torch.device(device)
        self._classifiers: dict[str, EvaluationClassifier] = {}
        self._lpips: dict[tuple[str, str], LPIPS] = {}

    @classmethod
    def classifier_key(cls, cell: Cell) -> str:
        """Cells with equal keys share one evaluation classifier: those on the same dataset (name and
        parameters) and with the same judge, whatever their target, training recipe, cut, defense or attack. The
        fixed judge's key is the dataset's alone (as before the user's judges); the user's adds its entry, whose
        weights digest tells two judges apart."""
        judge = cell["evaluation"]["classifier"]
        if isinstance(judge, dict):
            return config_hash({"dataset": cell["dataset"], "classifier": judge})
        return config_hash({"dataset": cell["dataset"]})

    def classifier(self, cell: Cell, data: Dataset) -> EvaluationClassifier:
        """The evaluation classifier of the cell's dataset ``data``: the fixed one (trained now or loaded from
        the cache), or the user's (loaded from its weights)."""
        key = self.classifier_key(cell)
        judge = cell["evaluation"]["classifier"]
        if key not in self._classifiers:
            self._classifiers[key] = (load_evaluation_classifier(data, judge, self.device)
                                      if isinstance(judge, dict) else
                                      get_evaluation_classifier(data, self.cache_dir, self.progress,
                                                                device=self.device))
        return self._classifiers[key]

    def lpips(self, weights: str, net: str) -> LPIPS:
        if (weights, net) not in self._lpips:
            self._lpips[(weights, net)] = LPIPS(weights, net, self.device)
        return self._lpips[(weights, net)]

    def metrics(self, cell: Cell, data: Dataset, images: torch.Tensor, truth: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Per-image metrics of the reconstructions ``images`` of ``truth``, test images of class ``labels``
        (None: they are the first test images, ``data.y_test[:len(images)]``), and a note for the diagnostics:
        which judge scored them (``evaluator``, its identity, None without one; ``evaluator_test_accuracy``;
        ``classifier``, the details) and why a metric is missing."""
        ev = cell["evaluation"]
        per_image: dict[str, list[float]] = {}
        note: dict[str, Any] = {"evaluator": None, "evaluator_test_accuracy": None, "unavailable": {}}
        if ev["classifier"]:
            judge = self.classifier(cell, data)
            labels = data.y_test[:len(images)] if labels is None else labels
            per_image.update(judge.classifier_metrics(images, labels))
            note["evaluator"] = judge.identity
            note["evaluator_test_accuracy"] = judge.test_accuracy
            note["classifier"] = {"model": judge.architecture, "seed": judge.seed, "checkpoint": judge.checkpoint,
                                  "weights": judge.weights, "test_accuracy": judge.test_accuracy}
            if judge.weights_file is not None:
                note["classifier"]["weights_file"] = judge.weights_file
        else:
            note["unavailable"]["attack_top1"] = "evaluation.classifier is false"
        if ev["lpips_weights"]:
            per_image["lpips"] = self.lpips(ev["lpips_weights"], ev["lpips_net"])(images, truth)
        else:
            note["unavailable"]["lpips"] = LPIPS_UNAVAILABLE
        return per_image, note
