"""Metrics, the matrix runner, the result store, tables, figures and the ``leakbench`` CLI."""
from evaluation import metrics
from evaluation.config import Cell, ConfigError, ExperimentConfig, load_config
from evaluation.runner import Matrix
from evaluation.store import ResultStore

__all__ = ["metrics", "Cell", "ConfigError", "ExperimentConfig", "load_config", "Matrix", "ResultStore"]
