"""The Defense base: what stands between the client and the server, and what it guarantees."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from splitnn.params import Declared, Seed

if TYPE_CHECKING:
    from splitnn.training import TrainConfig

Kind = Literal["transform", "training"]


class Defense(Declared):
    """A defense declares its ``kind``:

    - ``"transform"``: acts on the features at the cut at inference time; ``__call__(features)``.
    - ``"training"``: changes how the model is trained (hooks ``splitnn.train``).

    Hooks (all optional, see the README's "Defenses" section):

    - transform defenses that need data set ``needs_fit`` and implement
      ``fit(client, server, x_train, y_train) -> server``; the runner calls it once before use.
    - training defenses implement ``prepare_model(model) -> model`` (may change the architecture)
      and ``train_model(model, x, y, config, cut) -> report``; ``splitnn.train`` calls both, and
      ``restore(report)`` when the model comes from the checkpoint cache.

    Randomness comes from ``seed`` alone, so a cell is reproducible. Parameters are declared once, in the
    constructor's annotated signature (``splitnn.params``); ``params`` lists them without the seed.
    """

    kind: ClassVar[Kind] = "transform"
    name: ClassVar[str] = "defense"
    #: What ``guarantee()`` certifies, in words (listed by ``leakbench defenses``).
    guarantee_type: ClassVar[str] = "none"
    #: Transform defenses: whether ``fit()`` must run on training data before ``transform()``.
    needs_fit: ClassVar[bool] = False
    #: Training defenses: whether training needs the name of the cut (e.g. NoPeek's penalty there).
    uses_cut: ClassVar[bool] = False
    #: Attacker knowledge this defense takes away (e.g. ``{"client_weights"}`` for a client with a secret
    #: key); the runner marks cells of attacks that need any of it not applicable. Values of attacks.Knowledge.
    denies: ClassVar[frozenset[str]] = frozenset()
    unlisted = ("seed",)

    def __init__(self, seed: Seed = 0):
        self.seed = seed
        self._generator: torch.Generator | None = None
        #: Training defenses: what ``train_model`` reported (empty until trained or restored).
        self.report: dict[str, Any] = {}

    def guarantee(self) -> dict[str, Any]:
        """A formal guarantee, e.g. ``{"epsilon": 1.0, "delta": 1e-5}``; empty when there is none."""
        return {}

    def reseeded(self, seed: int | None = None) -> "Defense":
        """A copy whose random stream starts again, from ``seed`` (default: this defense's own seed)."""
        fresh = copy.deepcopy(self)
        fresh.seed = self.seed if seed is None else seed
        fresh._generator = None
        return fresh

    def generator(self, device: torch.device) -> torch.Generator:
        """The defense's random stream, seeded once and advanced by every call."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind != "transform":
            return features
        return self.transform(features)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a transform defense without a transform()")

    # ------------------------------------------------------------ transform defenses that learn from data

    def fit(self, client: nn.Module, server: nn.Module, x_train: torch.Tensor,
            y_train: torch.Tensor) -> nn.Module:
        """Learn what the transform needs from training data; return the server half to use with it."""
        return server

    # ------------------------------------------------------------ training defenses

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model to train (and to rebuild before loading a cached checkpoint); identity by default."""
        return model

    def train_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: "TrainConfig",
                    cut: str | None = None, progress: bool = True) -> dict[str, Any]:
        """Train ``model`` in place under this defense; return a JSON-able report (kept with the checkpoint)."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} defense and does not train models")

    def restore(self, report: dict[str, Any]) -> None:
        """Take back the report of an earlier ``train_model`` (a cached checkpoint), e.g. the epsilon spent."""
        self.report = dict(report)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
