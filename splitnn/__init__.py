"""The substrate: model zoo, splitting a model at a cut, datasets and training."""
from leakbench.splitnn import datasets, zoo
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.hooks import TrainingHooks
from leakbench.splitnn.model import SplitModel
from leakbench.splitnn.split import split, valid_cuts
from leakbench.splitnn.training import TrainConfig, TrainedModel, accuracy, train

__all__ = ["datasets", "zoo", "ParameterError", "SplitModel", "split", "valid_cuts", "TrainConfig",
           "TrainedModel", "TrainingHooks", "accuracy", "train"]
