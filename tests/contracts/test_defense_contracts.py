"""The contract every registered defense keeps, generated from the registry (``defenses.names()``, read when the
module is collected), so a defense registered with the package is checked with nothing added here: its kind is
its base class; its output has the input's shape, is finite and comes from its seed alone (a training defense
passes the features unchanged); bad parameters are refused naming the key; and its declared ``strength_zero``
is no defense (the identity for a transform, plain training for a training defense). The last tests show that
a defense registered inside a test is checked the same way, and that a wrong declaration is caught."""
from typing import Annotated

import pytest
import torch
from pydantic import Field

from harness import bad_values
from leakbench import defenses
from leakbench.defenses import FeatureDefense, TrainingDefense
from leakbench.defenses.noise import GaussianNoise
from leakbench.defenses.nopeek import NoPeek
from leakbench.splitnn import ParameterError, TrainConfig, datasets, zoo
from leakbench.splitnn.params import Seed
from leakbench.splitnn.training import fit


def defense_cases() -> list:
    """One case per registered defense, read from the registry when called."""
    return [pytest.param(name, id=name) for name in defenses.names()]


def built(name: str, cut, **params):
    """The defense as the runner uses it: fitted on a few training images first when it ``needs_fit``."""
    defense = defenses.get(name, **params)
    if defense.needs_fit:
        defense.fit(cut.client, cut.server, cut.data.x_train[:64], cut.data.y_train[:64])
    return defense


# ---------------------------------------------------------------- the checks, one per clause of the contract

def check_kind(name: str, cut) -> None:
    cls = defenses.defense_class(name)
    assert issubclass(cls, FeatureDefense) != issubclass(cls, TrainingDefense), name
    assert cls.kind == ("transform" if issubclass(cls, FeatureDefense) else "training"), name


def check_output(name: str, cut) -> None:
    out = built(name, cut, seed=3)(cut.features)
    assert out.shape == cut.features.shape and out.dtype == cut.features.dtype
    assert torch.isfinite(out).all()
    assert torch.equal(built(name, cut, seed=3)(cut.features), out)  # its randomness comes from the seed alone
    if defenses.defense_class(name).kind == "training":  # it changed the training; the cut sends what it computes
        assert torch.equal(out, cut.features)


def check_parameters(name: str, cut) -> None:
    with pytest.raises(ParameterError) as info:
        defenses.get(name, not_a_parameter=1)
    assert info.value.key == "not_a_parameter"
    for key, value in bad_values(defenses.defense_class(name)):
        with pytest.raises(ParameterError) as info:
            defenses.get(name, **{key: value})
        assert info.value.key == key and key in str(info.value), (key, value)


def _plain_or_hooked_training(hooks) -> dict[str, torch.Tensor]:
    """The weights (and BatchNorm statistics) of ResNet-20 after one epoch on 96 8x8 digits, with ``hooks``."""
    data = datasets.get("digits", size=8)
    torch.manual_seed(0)
    model = zoo.get("resnet20", num_classes=10)
    model = hooks.prepare_model(model) if hooks is not None else model
    fit(model, data.x_train[:96], data.y_train[:96], epochs=1, lr=0.05, batch_size=32, weight_decay=5e-4, seed=0,
        progress=False, hooks=hooks)
    return model.state_dict()


def check_strength_zero(name: str, cut) -> None:
    cls = defenses.defense_class(name)
    zero = cls.strength_zero
    if zero is None:
        pytest.skip(f"{name} declares no strength zero (strength_zero = None: no setting of it is no defense)")
    assert set(zero) <= set(cls.declared()), name  # of its own parameters
    if cls.kind == "transform":
        assert torch.equal(built(name, cut, **zero)(cut.features), cut.features)
        return
    hooks = defenses.hooks_for(TrainConfig("resnet20", "digits", cut="layer1",
                                           defense={"name": name, "params": dict(zero)}))
    plain, defended = _plain_or_hooked_training(None), _plain_or_hooked_training(hooks)
    assert plain.keys() == defended.keys()
    assert all(torch.equal(plain[k], defended[k]) for k in plain), name


CHECKS = (check_kind, check_output, check_parameters, check_strength_zero)


# ---------------------------------------------------------------- generated from the registry

@pytest.mark.parametrize("name", defense_cases())
def test_its_kind_is_its_base_class(name, tiny_cut):
    check_kind(name, tiny_cut)


@pytest.mark.parametrize("name", defense_cases())
def test_its_output_has_the_input_shape_and_comes_from_its_seed(name, tiny_cut):
    check_output(name, tiny_cut)


@pytest.mark.parametrize("name", defense_cases())
def test_bad_parameters_are_refused_naming_the_key(name, tiny_cut):
    check_parameters(name, tiny_cut)


@pytest.mark.parametrize("name", defense_cases())
def test_strength_zero_is_no_defense(name, tiny_cut):
    check_strength_zero(name, tiny_cut)


# ---------------------------------------------------------------- the generation and the checks themselves

class _Shrink(FeatureDefense):
    """A throwaway defense: features times ``keep``."""

    strength_zero = {"keep": 1.0}

    def __init__(self, keep: Annotated[float, Field(gt=0, le=1)] = 0.5, seed: Seed = 0):
        super().__init__(seed)
        self.keep = keep

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.keep


def test_a_defense_registered_in_a_test_joins_the_generated_cases_and_keeps_the_contract(tiny_cut):
    assert "shrink_for_test" not in defenses.names()
    defenses.register("shrink_for_test")(_Shrink)
    try:
        assert "shrink_for_test" in [case.id for case in defense_cases()]
        assert {"keep"} <= {key for key, _ in bad_values(_Shrink)}  # both of its bounds are tried
        for check in CHECKS:
            check("shrink_for_test", tiny_cut)
    finally:
        defenses.unregister("shrink_for_test")
    assert "shrink_for_test" not in [case.id for case in defense_cases()]


class _LoudNoise(GaussianNoise):
    strength_zero = {"scale": 0.1}  # wrong: noise is still added


class _StickyNoPeek(NoPeek):
    strength_zero = {"alpha": 1.0}  # wrong: the penalty is still on


@pytest.mark.parametrize("name, cls", [("loud_noise_for_test", _LoudNoise), ("sticky_nopeek_for_test", _StickyNoPeek)])
def test_a_wrong_strength_zero_is_caught(name, cls, tiny_cut):
    """The strength-zero check fails for a declaration that is not the identity (noise left on) or not plain
    training (NoPeek's penalty left on)."""
    defenses.register(name)(cls)
    try:
        with pytest.raises(AssertionError):
            check_strength_zero(name, tiny_cut)
    finally:
        defenses.unregister(name)
