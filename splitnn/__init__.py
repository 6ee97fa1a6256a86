"""The substrate: model zoo, splitting a model at a cut, datasets and training."""
from splitnn import datasets, zoo
from splitnn.errors import ParameterError
from splitnn.hooks import TrainingHooks
from splitnn.model import SplitModel
from splitnn.split import split, valid_cuts
from splitnn.training import TrainConfig, TrainedModel, accuracy, train

__all__ = ["datasets", "zoo", "ParameterError", "SplitModel", "split", "valid_cuts", "TrainConfig",
           "TrainedModel", "TrainingHooks", "accuracy", "train"]
