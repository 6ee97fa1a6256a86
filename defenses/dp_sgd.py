"""DP-SGD with Opacus: train the whole split model to a target (epsilon, delta), and its non-private
baseline (the same GroupNorm architecture trained with plain SGD)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from defenses.base import Defense
from defenses.registry import register
from splitnn.params import Positive, PositiveCount, Seed

if TYPE_CHECKING:
    from splitnn.training import TrainConfig

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
class DPSGD(Defense):
    """Trains the split model with DP-SGD (Opacus ``make_private_with_epsilon``, Poisson sampling) to a
    target (epsilon, delta) per training example; BatchNorm becomes GroupNorm (``ModuleValidator.fix``).

    ``epochs=None`` uses the training config's epochs. After training the accountant's epsilon is
    recorded as the guarantee; training fails with PrivacyBudgetExceeded if it exceeds the target.
    DP-SGD protects the membership of training examples, not the inputs a client sends at inference.
    """

    kind = "training"
    guarantee_type = "(epsilon, delta)-DP per training example (DP-SGD, Opacus accountant)"

    # Opacus searches the noise multiplier to a tolerance of 0.01 in epsilon: a smaller target never ends.
    def __init__(self, epsilon: Annotated[float, Field(ge=MIN_EPSILON, le=1e6)] = 8.0,
                 delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5, max_grad_norm: Positive = 1.0,
                 epochs: PositiveCount | None = None, accountant: Accountant = "rdp", seed: Seed = 0):
        super().__init__(seed)
        self.epsilon, self.delta, self.max_grad_norm = epsilon, delta, max_grad_norm
        self.epochs, self.accountant = epochs, accountant

    def guarantee(self) -> dict[str, Any]:
        """epsilon is the accountant's (<= target) once trained; the target until then."""
        return {"epsilon": self.report.get("epsilon_spent", self.epsilon), "epsilon_target": self.epsilon,
                "delta": self.delta, "accountant": self.accountant, "mechanism": "DP-SGD (Opacus)",
                "unit": "per training example", "noise_multiplier": self.report.get("noise_multiplier"),
                "max_grad_norm": self.max_grad_norm, "architecture": FIX_NOTE,
                "note": "protects training-set membership; does not bound reconstruction of inference inputs"}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return opacus_fix(model)

    def train_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: "TrainConfig",
                    cut: str | None = None, progress: bool = True) -> dict[str, Any]:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        epochs = self.epochs if self.epochs is not None else config.epochs
        loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed))
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                                    weight_decay=config.weight_decay)
        engine = PrivacyEngine(accountant=self.accountant)
        model.train()
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=self.epsilon,
            target_delta=self.delta, epochs=epochs, max_grad_norm=self.max_grad_norm,
            noise_generator=torch.Generator().manual_seed(self.seed + 1))
        steps = 0
        try:
            for _ in tqdm(range(epochs), desc="DP-SGD", unit="epoch", disable=not progress, leave=False):
                for xb, yb in loader:
                    optimizer.zero_grad()
                    F.cross_entropy(private(xb), yb).backward()
                    optimizer.step()
                    steps += 1
        finally:
            private.cleanup()  # remove Opacus's hooks and per-sample gradients from ``model``
        spent = float(engine.get_epsilon(self.delta))
        if spent > self.epsilon * (1 + 1e-9):
            raise PrivacyBudgetExceeded(f"the {self.accountant} accountant reports epsilon {spent:.4g} spent, "
                                        f"more than the target {self.epsilon:.4g} (delta {self.delta:g})")
        model.eval()
        return {"epsilon_spent": spent, "noise_multiplier": float(optimizer.noise_multiplier), "steps": steps,
                "epochs": epochs, "sample_rate": 1 / len(loader), "architecture": FIX_NOTE}


@register("groupnorm_baseline")
class GroupNormBaseline(Defense):
    """No defense for a DP-SGD comparison: the same GroupNorm model (``ModuleValidator.fix``) trained with
    plain SGD, so the undefended row of a DP-SGD study has the same architecture."""

    kind = "training"

    def guarantee(self) -> dict[str, Any]:
        return {}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return opacus_fix(model)

    def train_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: "TrainConfig",
                    cut: str | None = None, progress: bool = True) -> dict[str, Any]:
        from splitnn.training import fit

        fit(model, x, y, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
            weight_decay=config.weight_decay, seed=config.seed, progress=progress)
        return {"architecture": FIX_NOTE}
