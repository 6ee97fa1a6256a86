"""The defense bases: a thin common ``Defense`` (parameters, seed, guarantee, what it declares), and its two
kinds, ``FeatureDefense`` (acts on the features at the cut) and ``TrainingDefense`` (hooks ``splitnn.train``).
A defense's kind is its base class; consumers read it, its strength zero and whether it is a baseline from the
class, never from its name."""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from leakbench.contracts import Knowledge
from leakbench.splitnn import devices
from leakbench.splitnn.hooks import TrainingHooks
from leakbench.splitnn.lazy_images import Images
from leakbench.splitnn.params import Declared, Seed

Kind = Literal["transform", "training"]


class Defense(Declared):
    """What every defense has. Subclass ``FeatureDefense`` or ``TrainingDefense``, never this directly.

    Randomness comes from ``seed`` alone, so a cell is reproducible. Parameters are declared once, in the
    constructor's annotated signature (``splitnn.params``); ``params`` lists them without the seed.
    """

    #: Set by the two kind bases (``transform`` or ``training``); a defense does not set it itself.
    kind: ClassVar[Kind]
    name: ClassVar[str] = "defense"
    #: What ``guarantee()`` certifies, in words (listed by ``leakbench defenses``).
    guarantee_type: ClassVar[str] = "none"
    #: The parameters at which the defense does nothing (a feature defense passes the features unchanged, a
    #: training defense trains the model plain training would); None when no setting does.
    strength_zero: ClassVar[Mapping[str, Any] | None] = None
    #: An undefended reference row (no defense, or the same architecture without the defense): tables compare
    #: the defenses with it and never mark it the best defense.
    baseline: ClassVar[bool] = False
    #: Attacker knowledge this defense takes away (e.g. ``{Knowledge.CLIENT_WEIGHTS}`` for a client with a
    #: secret key); the runner marks cells of attacks that need any of it not applicable.
    denies: ClassVar[frozenset[Knowledge]] = frozenset()
    #: Transform defenses: whether ``fit()`` must run on training data before ``transform()``.
    needs_fit: ClassVar[bool] = False
    #: Training defenses: whether training needs the name of the cut (e.g. NoPeek's penalty there).
    uses_cut: ClassVar[bool] = False
    unlisted = ("seed",)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__ and cls.__module__ != __name__:
            raise TypeError(f"{cls.__name__} sets kind; derive it from FeatureDefense or TrainingDefense instead")

    def __init__(self, seed: Seed = 0):
        self.seed = seed
        self._generator: torch.Generator | None = None
        #: What fitting or training reported (e.g. the epsilon spent); empty until then, or restored from a cache.
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
        """The features the server receives."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class FeatureDefense(Defense):
    """Acts on the features at the cut at inference time: ``transform(features) -> features``, seeded. One that
    learns from data sets ``needs_fit`` and implements ``fit``; the runner calls it once before use."""

    kind = "transform"

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.transform(features)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a feature defense without a transform()")

    def fit(self, client: nn.Module, server: nn.Module, x_train: Images,
            y_train: torch.Tensor) -> nn.Module:
        """Learn what the transform needs from training data; return the server half to use with it. ``x_train``
        may decode on demand (``splitnn.lazy_images``): index or slice it, never ask for all of it at once."""
        return server


class TrainingDefense(Defense, TrainingHooks):
    """Changes how the model is trained, as hooks of ``splitnn.train``'s one loop (``splitnn.hooks``); the
    features pass unchanged at inference. ``finish`` returns the report; ``restore`` takes it back from a cache."""

    kind = "training"
    #: The cut, given by ``defenses.hooks_for`` to a defense that ``uses_cut``; None otherwise.
    cut: str | None = None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def restore(self, report: dict[str, Any]) -> None:
        self.report = dict(report)


def sampled_features(client: nn.Module, server: nn.Module, x_train: Images, y_train: torch.Tensor, samples: int,
                     seed: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A fitted defense's training material: the client's features (no gradient) and the labels of a seeded
    sample of ``samples`` training images, computed in batches (both halves put in eval mode), and the seeded
    generator that drew the sample, for the fit's own shuffles. The sample is drawn on the CPU (the same on every
    device); each batch, and the labels, go to the client's device (``splitnn.devices.of``)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x_train), generator=generator)[:samples]
    client.eval()
    server.eval()
    device = devices.of(client)
    with torch.no_grad():
        features = torch.cat([client(x_train[index[i:i + batch_size]].to(device))
                              for i in range(0, len(index), batch_size)])
    return features, y_train[index].to(device), generator
