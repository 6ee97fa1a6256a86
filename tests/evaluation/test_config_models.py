"""Configs with several models: each entry may override ``train``; rows name the model variant."""
import pytest

from harness import BASE_MAPPING
from leakbench.evaluation.config import ConfigError, ExperimentConfig


def test_a_model_list_expands_into_cells_with_their_own_train_settings():
    config = ExperimentConfig({**BASE_MAPPING, "model": [
        "resnet20", {"name": "resnet20", "params": {"norm": "none", "post_relu": False}, "train": {"epochs": 0}}]})
    cells = config.cells()
    assert len(cells) == 2 and cells[0].key != cells[1].key
    assert [c["train"]["epochs"] for c in cells] == [3, 0]
    assert cells[1].train_config().model_params == {"norm": "none", "post_relu": False}
    assert cells[0].label().startswith("digits | resnet20 | layer1")
    assert cells[1].label().startswith("digits | resnet20(norm=none, post_relu=False) untrained | layer1")


def test_a_dataset_list_gives_each_dataset_its_cells_with_resolved_params():
    config = ExperimentConfig({**BASE_MAPPING, "model": "resnet20",
                                       "dataset": [{"name": "lfw_faces", "params": {"size": 16}}, "portraits"]})
    cells = config.cells()
    assert [c["dataset"]["name"] for c in cells] == ["lfw_faces", "portraits"]
    assert cells[1]["dataset"]["params"] == {"size": 64, "channels": 3}
    with pytest.raises(ConfigError) as err:
        ExperimentConfig({**BASE_MAPPING, "model": "resnet20",
                          "dataset": ["digits", {"name": "portraits", "params": {"size": 4}}]})
    assert err.value.key == "dataset[1].params.size"


def test_a_single_model_gives_the_same_cell_as_a_one_entry_list():
    single = ExperimentConfig({**BASE_MAPPING, "model": "resnet20"}).cells()
    listed = ExperimentConfig({**BASE_MAPPING, "model": [{"name": "resnet20"}]}).cells()
    assert [c.key for c in single] == [c.key for c in listed]


@pytest.mark.parametrize("model, key", [
    ([{"name": "resnet20"}, {"name": "resnet20", "train": {"epochs": -1}}], "model[1].train.epochs"),
    ([{"name": "resnet20"}, {"name": "resnet20", "train": {"steps": 1}}], "model[1].train.steps"),
    ([{"name": "resnet20", "params": {"activation": "tanh"}}], "model[0].params.activation"),
    ({"name": "resnet20", "params": {"maxpool": "yes"}}, "model.params.maxpool"),
])
def test_bad_model_entries_name_their_key(model, key):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig({**BASE_MAPPING, "model": model})
    assert err.value.key == key
