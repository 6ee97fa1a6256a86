"""What consumers read from a defense class (its kind, baseline, strength zero); the one-way import from splitnn
(it trains with hooks and imports nothing of defenses) is tests/test_layers.py. Per registered defense (its kind
is its base class; a training defense passes the features unchanged at inference) the contract suite checks it
(tests/contracts/test_defense_contracts.py)."""

import pandas as pd
import pytest

from leakbench import defenses
from leakbench.defenses.base import FeatureDefense, TrainingDefense
from leakbench.evaluation.tables import best_rows, matrix_table
from leakbench.splitnn.hooks import TrainingHooks


def test_kind_is_the_base_class():
    assert issubclass(TrainingDefense, TrainingHooks)
    assert defenses.defense_class("dp_sgd").kind == "training" and defenses.defense_class("topk").kind == "transform"


def test_a_defense_cannot_set_its_own_kind():
    with pytest.raises(TypeError, match="FeatureDefense or TrainingDefense"):
        type("Odd", (FeatureDefense,), {"kind": "training"})


def test_baselines_are_declared_on_the_class():
    assert {n for n in defenses.names() if defenses.defense_class(n).baseline} == {"none", "groupnorm_baseline"}


def _cell(defense, accuracy, psnr):
    return {"key": defense, "status": "done", "dataset": "digits", "model": "resnet20", "cut": "layer1", "seed": 0,
            "defense": defense, "defense_params": "{}", "attack": "peel", "attack_params": "{}",
            "accuracy": accuracy, "psnr": psnr, "attack_top1": 0.5, "guarantee_json": "{}", "current": True}


def test_groupnorm_baseline_never_competes_for_best_defense():
    """It leaks least here, yet it is the undefended GroupNorm reference: dp_sgd is marked instead."""
    frame = pd.DataFrame([_cell("none", 0.90, 60.0), _cell("groupnorm_baseline", 0.88, 10.0),
                          _cell("dp_sgd", 0.87, 12.0)])
    table = matrix_table(frame)
    best = best_rows(table)["peel: PSNR (dB)"]
    assert [table.loc[i, "defense"] for i in best] == ["dp_sgd"]
