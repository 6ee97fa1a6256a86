"""The training-hooks protocol: how a training defense changes ``splitnn.train``'s one loop without owning a
loop of its own (as Opacus's ``make_private`` hands back wrapped versions of the caller's objects).

The loop calls, in order: ``prepare_model`` (also before loading a cached checkpoint), ``recipe`` (the epochs,
lr, batch size and weight decay to train with, e.g. DP-SGD's tuned ones), ``wrap`` (model, optimizer, loader)
once, ``loss_term`` on every batch, ``finish`` once after the last step (its report is kept with the
checkpoint), and ``restore`` with that report when the model comes from the cache.
Every method has a no-op default, so a hook implements only what it changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class Recipe:
    """What the loop trains with: the training config's plan, or what a training defense makes of it (a DP-SGD
    recipe tuned under clipping and noise is not the plain one). The loader and the optimizer follow it."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float


class TrainingHooks:
    """No-op training hooks; subclass and override what changes (see the module docstring for the order)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "train_epochs" in cls.__dict__:  # the old hook would be ignored without a word
            raise TypeError(f"{cls.__name__} defines train_epochs(planned); return "
                            "dataclasses.replace(planned, epochs=...) from recipe(planned) instead")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model to train (and to rebuild before a cached checkpoint is loaded), e.g. BatchNorm -> GroupNorm."""
        return model

    def recipe(self, planned: Recipe) -> Recipe:
        """The recipe the loop runs; ``planned`` is the training config's (``dataclasses.replace`` it)."""
        return planned

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int
             ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Before the loop: the (model, optimizer, loader) to train with; the loop saves the prepared model, so
        a wrapper must share its parameters (e.g. Opacus's ``make_private_with_epsilon``)."""
        return model, optimizer, loader

    def loss_term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  outputs: torch.Tensor) -> torch.Tensor | None:
        """A term added to the batch's cross-entropy (``model`` is the wrapped one); None adds nothing."""
        return None

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """After the last step: undo what ``wrap`` attached, check what was promised; a JSON-able report."""
        return {}

    def restore(self, report: dict[str, Any]) -> None:
        """Take back the report of an earlier ``finish`` (the model came from the checkpoint cache)."""
