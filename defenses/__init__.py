"""Defenses that stand between the client and the server half."""
from leakbench.defenses import (adversarial, disco, dp_sgd, learned_noise, noise, nopeek,  # noqa: F401
                                projection, pruning, sparsify, vib)  # (register the defenses)
from leakbench.defenses.base import Defense, FeatureDefense, TrainingDefense
from leakbench.defenses.registry import defense_class, get, hooks_for, names, register, unregister

__all__ = ["Defense", "FeatureDefense", "TrainingDefense", "defense_class", "get", "hooks_for", "names", "register",
           "unregister"]
