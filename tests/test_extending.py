"""Adding a transform defense is one class and one registration (the README's "Extending leakbench" shows this
one): with nothing else touched it is validated from its signature, listed by the CLI, runs from YAML, and
defense-aware PEEL reads it through the reader registered beside it."""
import json
import textwrap

import pytest
import torch

from leakbench import defenses
from leakbench.attacks.peel import register_reader
from leakbench.attacks.peel.observation import Masked
from leakbench.defenses import FeatureDefense
from leakbench.evaluation import ResultStore
from leakbench.evaluation.cli import main
from leakbench.splitnn import ParameterError
from leakbench.splitnn.params import NonNegative, Seed


class ZeroSmall(FeatureDefense):
    """Releases only the features whose magnitude is at least ``below``; the others are sent as zeros."""

    strength_zero = {"below": 0.0}

    def __init__(self, below: NonNegative = 0.1, seed: Seed = 0):
        super().__init__(seed)
        self.below = below

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return features * (features.abs() >= self.below)


def read_zero_small(defense, observed):  # what defense-aware PEEL may assume: the nonzero entries are exact
    return Masked(observed, defense.name, "fit on the entries it released", mask=observed.ne(0))


@pytest.fixture
def zero_small():
    defenses.register("zero_small")(ZeroSmall)
    register_reader(ZeroSmall)(read_zero_small)
    yield ZeroSmall
    defenses.unregister("zero_small")


CONFIG = """
name: extending
dataset: {name: digits, params: {size: 16}}
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses: [{name: zero_small, params: {below: 0.5}}]
attacks: [{name: peel, params: {adaptive: true, max_iter: 10, refine_iter: 20}}]
evaluation: {num_images: 2, classifier: false}
"""


def test_a_new_defense_is_validated_listed_run_and_read_by_adaptive_peel(zero_small, tmp_path, capsys):
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(zero_small(**zero_small.strength_zero)(x), x)  # its declared strength zero is the identity
    with pytest.raises(ParameterError) as info:
        defenses.get("zero_small", below=-1.0)
    assert info.value.key == "below"
    assert main(["defenses"]) == 0 and "zero_small" in capsys.readouterr().out
    path = tmp_path / "extending.yaml"
    path.write_text(textwrap.dedent(CONFIG).replace("below: 0.5", "below: -0.5"))
    assert main(["validate", str(path)]) == 2 and "defenses[0].params.below" in capsys.readouterr().err
    path.write_text(textwrap.dedent(CONFIG))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    with ResultStore(tmp_path / "out" / "results.sqlite", read_only=True) as store:
        cell = store.cells().iloc[0]
    assert cell.status == "done" and json.loads(cell.defense_params) == {"below": 0.5}
    assert json.loads(cell.diagnostics_json)["attack"]["adaptive"]["model"] == "masked"
