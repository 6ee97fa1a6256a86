"""Metrics, the matrix runner, the result store, tables, figures and the ``leakbench`` CLI."""
from leakbench.evaluation import metrics
from leakbench.evaluation.config import Cell, ConfigError, ExperimentConfig, load_config
from leakbench.evaluation.runner import Matrix
from leakbench.evaluation.store import ResultStore

__all__ = ["metrics", "Cell", "ConfigError", "ExperimentConfig", "load_config", "Matrix", "ResultStore"]
