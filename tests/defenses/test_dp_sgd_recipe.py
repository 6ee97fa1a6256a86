"""A training defense owns its recipe (``splitnn.hooks.Recipe``): the loop builds its loader and optimizer from
what ``recipe(planned)`` returns, and DP-SGD's tuned epochs, lr, batch size and weight decay are parameters of
the defense (validated, in the checkpoint hash and the cell key)."""
import math
import textwrap
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from leakbench import defenses
from leakbench.evaluation import load_config
from leakbench.splitnn import ParameterError, TrainConfig, datasets, zoo
from leakbench.splitnn.hooks import Recipe, TrainingHooks
from leakbench.splitnn.training import fit

PLAN = Recipe(epochs=2, lr=0.1, batch_size=16, weight_decay=5e-4)
OWN = Recipe(epochs=1, lr=0.3, batch_size=8, weight_decay=0.0)


class _Spy:
    """Records what the loop built (the loader's batch size, the optimizer's settings) and every step's lr."""

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int
             ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        group = optimizer.param_groups[0]
        self.built = {"batch_size": loader.batch_size, "lr": group["lr"], "weight_decay": group["weight_decay"],
                      "epochs": epochs}
        model, optimizer, loader = super().wrap(model, optimizer, loader, epochs=epochs)  # type: ignore[misc]
        self.optimizer, self.lrs = optimizer, []
        return model, optimizer, loader

    def loss_term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  outputs: torch.Tensor) -> torch.Tensor | None:
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        return super().loss_term(model, x, y, outputs)  # type: ignore[misc]


class _OwnRecipe(_Spy, TrainingHooks):
    def recipe(self, planned: Recipe) -> Recipe:
        return OWN


class _PlainRecipe(_Spy, TrainingHooks):
    pass


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    return model, torch.randn(64, 1, 8, 8), torch.randint(0, 2, (64,))


def _fit(hooks: TrainingHooks, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    return fit(model, x, y, epochs=PLAN.epochs, lr=PLAN.lr, batch_size=PLAN.batch_size,
               weight_decay=PLAN.weight_decay, seed=0, progress=False, hooks=hooks)


def _cosine(recipe: Recipe, n: int) -> list[float]:
    steps = recipe.epochs * math.ceil(n / recipe.batch_size)
    return [recipe.lr * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]


@pytest.mark.parametrize("spy, used", [(_PlainRecipe, PLAN), (_OwnRecipe, OWN)])
def test_the_loop_builds_its_loader_optimizer_and_schedule_from_the_hooks_recipe(spy, used):
    """With the default hook the loop runs the plan; with a recipe of its own, that recipe (so the check
    tells them apart: the two recipes differ in every field)."""
    assert all(getattr(PLAN, f) != getattr(OWN, f) for f in ("epochs", "lr", "batch_size", "weight_decay"))
    hooks = spy()
    model, x, y = _tiny()
    _fit(hooks, model, x, y)
    assert hooks.built == {"batch_size": used.batch_size, "lr": used.lr, "weight_decay": used.weight_decay,
                           "epochs": used.epochs}
    assert hooks.lrs == pytest.approx(_cosine(used, len(x)), rel=1e-6)  # steps and schedule follow it too


def test_the_default_recipe_hook_and_groupnorm_baseline_leave_the_plan_unchanged():
    assert TrainingHooks().recipe(PLAN) == PLAN
    assert defenses.get("groupnorm_baseline").recipe(PLAN) == PLAN
    assert defenses.get("dp_sgd").recipe(PLAN) == PLAN  # every recipe parameter None: the config's


def test_dp_sgd_overrides_only_the_recipe_parameters_it_sets():
    assert defenses.get("dp_sgd", lr=2.0).recipe(PLAN) == replace(PLAN, lr=2.0)
    assert defenses.get("dp_sgd", batch_size=128, weight_decay=0.0).recipe(PLAN) == replace(
        PLAN, batch_size=128, weight_decay=0.0)
    assert defenses.get("dp_sgd", epochs=25, lr=2.0, batch_size=128, weight_decay=0.0).recipe(PLAN) == Recipe(
        epochs=25, lr=2.0, batch_size=128, weight_decay=0.0)


def test_dp_sgd_trains_with_its_own_recipe_reports_it_and_stays_within_its_budget():
    """On 96 digits at 16x16, planned as the plain recipe: the loop uses DP-SGD's lr, (expected) batch size,
    weight decay and epochs, the report says so, and the accountant's epsilon meets the target."""
    data = datasets.get("digits", size=16)
    x, y = data.x_train[:96], data.y_train[:96]
    spy = type("SpyDPSGD", (_Spy, defenses.defense_class("dp_sgd")), {})(
        epsilon=4.0, epochs=1, lr=0.3, batch_size=32, weight_decay=0.0)
    torch.manual_seed(0)
    model = spy.prepare_model(zoo.get("resnet20", num_classes=10))
    report = fit(model, x, y, epochs=3, lr=0.05, batch_size=64, weight_decay=5e-4, seed=0, progress=False,
                 hooks=spy)
    assert spy.built == {"batch_size": 32, "lr": 0.3, "weight_decay": 0.0, "epochs": 1}
    assert {k: report[k] for k in ("epochs", "lr", "batch_size", "weight_decay")} == spy.built
    # Opacus's Poisson sampling with the expected batch size 32 of 96: rate 1/3, three steps in one epoch
    assert report["sample_rate"] == pytest.approx(1 / 3, rel=1e-9) and report["steps"] == 3
    assert spy.lrs[0] == pytest.approx(0.3, rel=1e-6)
    assert 4.0 - 0.01 <= spy.guarantee()["epsilon"] <= 4.0


def test_dp_sgd_recipe_parameters_enter_the_checkpoint_hash_and_the_cell_key(tmp_path):
    def key(**params: Any) -> str:
        return TrainConfig("resnet20", "digits", defense={"name": "dp_sgd", "params": params}).key()

    assert len({key(), key(lr=2.0), key(batch_size=128), key(weight_decay=0.0), key(epochs=25)}) == 5
    path = tmp_path / "dp.yaml"
    path.write_text(textwrap.dedent("""\
        name: dp-recipe
        seed: 0
        dataset: {name: digits, params: {size: 16}}
        model: resnet20
        train: {epochs: 1, batch_size: 64}
        cut: layer1
        defenses:
          - {name: dp_sgd, params: {epsilon: 8.0}}
          - {name: dp_sgd, params: {epsilon: 8.0, lr: 2.0, batch_size: 128, weight_decay: 0.0}}
        attacks:
          - {name: rmle, params: {iterations: 5}}
        evaluation: {num_images: 2}
        """))
    plain, tuned = load_config(path).cells()
    assert plain.key != tuned.key and plain.train_config().key() != tuned.train_config().key()
    assert tuned.train_config().defense["params"]["lr"] == 2.0
    assert tuned.train_config().defense["params"]["batch_size"] == 128


@pytest.mark.parametrize("params, key", [({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"),
                                         ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"),
                                         ({"batch_size": 12.5}, "batch_size"), ({"epochs": 0}, "epochs")])
def test_bad_recipe_parameters_are_refused_naming_the_key(params, key):
    with pytest.raises(ParameterError) as info:
        defenses.hooks_for(TrainConfig("resnet20", "digits", defense={"name": "dp_sgd", "params": params}))
    assert info.value.key == key


def test_a_hook_that_still_defines_train_epochs_is_refused_rather_than_ignored():
    with pytest.raises(TypeError, match="recipe"):
        type("Old", (TrainingHooks,), {"train_epochs": lambda self, planned: planned})
