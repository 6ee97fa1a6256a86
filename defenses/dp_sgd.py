"""DP-SGD with Opacus as hooks of the one training loop: the whole split model trained to a target (epsilon,
delta), and its non-private baseline (the same GroupNorm architecture, the same loop and schedule, no DP)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from leakbench.defenses.base import TrainingDefense
from leakbench.defenses.registry import register
from leakbench.splitnn.hooks import Recipe
from leakbench.splitnn.params import NonNegative, Positive, PositiveCount, Seed

Accountant = Literal["rdp", "prv", "gdp"]
FIX_NOTE = "BatchNorm replaced by GroupNorm (opacus ModuleValidator.fix)"
#: The smallest target epsilon Opacus's noise search can reach (its tolerance is 0.01).
MIN_EPSILON = 0.01


class PrivacyBudgetExceeded(RuntimeError):
    """The accountant reports more epsilon spent than the target."""


def opacus_fix(model: nn.Module) -> nn.Module:
    """The model with every layer Opacus cannot train privately replaced (BatchNorm -> GroupNorm)."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(f"Opacus cannot train this model even after ModuleValidator.fix: {errors}")
    return fixed


@register("dp_sgd")
class DPSGD(TrainingDefense):
    """Trains the split model with DP-SGD (Opacus ``make_private_with_epsilon``, Poisson sampling) to a
    target (epsilon, delta) per training example; BatchNorm becomes GroupNorm (``ModuleValidator.fix``).

    It hooks the one loop (``splitnn.train``: SGD with momentum, cosine schedule), so it differs from
    ``groupnorm_baseline`` only in the DP. It owns its recipe: ``epochs``, ``lr``, ``batch_size`` (Opacus's
    expected Poisson batch size) and ``weight_decay`` replace the training config's when set (None keeps it),
    since a recipe tuned under clipping and noise (``benchmarks/tune_dp_sgd.py``) is not the plain one; the
    report records the ones the loop used. After training the accountant's epsilon is recorded as the
    guarantee; training fails with PrivacyBudgetExceeded if it exceeds the target. DP-SGD protects the
    membership of training examples, not the inputs a client sends at inference.
    """

    guarantee_type = "(epsilon, delta)-DP per training example (DP-SGD, Opacus accountant)"
    strength_zero = None  # the noise cannot be switched off: epsilon is bounded; groupnorm_baseline is "no DP"

    # Opacus searches the noise multiplier to a tolerance of 0.01 in epsilon: a smaller target never ends.
    def __init__(self, epsilon: Annotated[float, Field(ge=MIN_EPSILON, le=1e6)] = 8.0,
                 delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5, max_grad_norm: Positive = 1.0,
                 epochs: PositiveCount | None = None, lr: Positive | None = None,
                 batch_size: PositiveCount | None = None, weight_decay: NonNegative | None = None,
                 accountant: Accountant = "rdp", seed: Seed = 0):
        super().__init__(seed)
        self.epsilon, self.delta, self.max_grad_norm = epsilon, delta, max_grad_norm
        self.epochs, self.lr, self.batch_size, self.weight_decay = epochs, lr, batch_size, weight_decay
        self.accountant = accountant
        self._used: dict[str, Any] = {}
        self._engine: Any = None
        self._private: Any = None
        self._optimizer: Any = None  # Opacus's DPOptimizer while training
        self._steps_per_epoch = 0

    def guarantee(self) -> dict[str, Any]:
        """epsilon is the accountant's (<= target) once trained; the target until then."""
        return {"epsilon": self.report.get("epsilon_spent", self.epsilon), "epsilon_target": self.epsilon,
                "delta": self.delta, "accountant": self.accountant, "mechanism": "DP-SGD (Opacus)",
                "unit": "per training example", "noise_multiplier": self.report.get("noise_multiplier"),
                "max_grad_norm": self.max_grad_norm, "architecture": FIX_NOTE,
                "note": "protects training-set membership; does not bound reconstruction of inference inputs"}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return opacus_fix(model)

    def recipe(self, planned: Recipe) -> Recipe:
        """The training config's recipe with each of this defense's recipe parameters that is set."""
        return Recipe(epochs=planned.epochs if self.epochs is None else self.epochs,
                      lr=planned.lr if self.lr is None else self.lr,
                      batch_size=planned.batch_size if self.batch_size is None else self.batch_size,
                      weight_decay=planned.weight_decay if self.weight_decay is None else self.weight_decay)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int
             ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Opacus's GradSampleModule, DPOptimizer (noise calibrated so the planned steps spend the target) and
        a Poisson-sampled loader with the expected batch size of ``loader``."""
        from opacus import PrivacyEngine

        self._engine = PrivacyEngine(accountant=self.accountant)
        group = optimizer.param_groups[0]  # what the loop built, recorded as what it trained with
        self._used = {"epochs": epochs, "lr": group["lr"], "batch_size": loader.batch_size,
                      "weight_decay": group["weight_decay"]}
        self._private, optimizer, loader = self._engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=self.epsilon,
            target_delta=self.delta, epochs=epochs, max_grad_norm=self.max_grad_norm,
            noise_generator=torch.Generator().manual_seed(self.seed + 1))
        self._optimizer, self._steps_per_epoch = optimizer, len(loader)
        return self._private, optimizer, loader

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Remove Opacus's hooks and per-sample gradients, and check the accountant's epsilon against the target."""
        self._private.cleanup()
        steps = sum(entry[-1] for entry in self._engine.accountant.history)  # (noise, sample rate, steps)
        spent = float(self._engine.get_epsilon(self.delta))
        if spent > self.epsilon * (1 + 1e-9):
            raise PrivacyBudgetExceeded(f"the {self.accountant} accountant reports epsilon {spent:.4g} spent, "
                                        f"more than the target {self.epsilon:.4g} (delta {self.delta:g})")
        self.report = {"epsilon_spent": spent, "noise_multiplier": float(self._optimizer.noise_multiplier),
                       "steps": steps, **self._used, "sample_rate": 1 / self._steps_per_epoch,
                       "architecture": FIX_NOTE}
        self._engine = self._private = self._optimizer = None
        return dict(self.report)


@register("groupnorm_baseline")
class GroupNormBaseline(TrainingDefense):
    """No defense for a DP-SGD comparison: the same GroupNorm model (``ModuleValidator.fix``) trained by the
    same loop and schedule without DP, so the undefended row of a DP-SGD study has the same architecture."""

    baseline = True
    strength_zero = None  # it changes the architecture: it is the reference, not a defense that can be turned off

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return opacus_fix(model)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        self.report = {"architecture": FIX_NOTE}
        return dict(self.report)
