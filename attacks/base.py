"""The Attack base: what an attacker knows, which cells it applies to, and what it returns."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from splitnn.params import Declared


class Knowledge(str, Enum):
    """What an attacker is assumed to know besides the features it receives."""

    CLIENT_WEIGHTS = "client_weights"   # white-box: the client half's architecture and weights
    AUXILIARY_DATA = "auxiliary_data"   # samples from the same distribution as the private data
    QUERY_ACCESS = "query_access"       # can run the client half on inputs of its choice
    DEFENSE = "defense"                 # knows the defense's kind and public parameters
    SERVER_WEIGHTS = "server_weights"   # holds the server half (an honest-but-curious server does)


@dataclass
class Reconstruction:
    """Reconstructed images (N, C, H, W) in [0, 1], plus what the attack reports about itself."""

    images: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: other reconstructions the attack produced on the way (e.g. PEEL's block-wise image before refinement)
    alternatives: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the recovered input of every stage of the client, input side first (PEEL's block-wise chain, in the
    #: solver's dtype), so the evaluator can score each block against the truth afterwards
    intermediates: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class PublicDefense:
    """What a defense-aware attacker knows of the defense: its name, kind and public parameters.

    Never the defense object itself, whose random stream would let an attacker replay the exact noise.
    """

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:  # a copy: nothing the attacker does reaches the defense's own parameters
        object.__setattr__(self, "params", copy.deepcopy(dict(self.params)))

    @classmethod
    def of(cls, defense: Any) -> "PublicDefense":
        """The public view of a Defense (``None``: no defense); a PublicDefense is returned as it is."""
        if isinstance(defense, PublicDefense):
            return defense
        if defense is None:
            return cls("none", "transform", {})
        return cls(str(defense.name), str(defense.kind), dict(defense.params))


#: The keys of ``diagnostics["budget"]``, the same for every attack (means over samples where per sample).
BUDGET_KEYS = ("end_to_end_iterations", "end_to_end_evaluations", "end_to_end_evaluations_per_sample",
               "blockwise_evaluations", "seconds")


def budget(seconds: float, iterations: torch.Tensor | None = None, evaluations: torch.Tensor | None = None,
           blockwise: torch.Tensor | None = None) -> dict[str, Any]:
    """What an attack spent: per-sample tensors (B,) of end-to-end iterations and evaluations (one full
    client forward + backward each) and block-wise stage evaluations, as means over samples, plus wall time."""
    def mean(t: torch.Tensor | None) -> float:
        return float(t.double().mean()) if t is not None and t.numel() else 0.0
    return {"end_to_end_iterations": mean(iterations), "end_to_end_evaluations": mean(evaluations),
            "end_to_end_evaluations_per_sample": [] if evaluations is None else [int(v) for v in evaluations],
            "blockwise_evaluations": mean(blockwise), "seconds": float(seconds)}


#: A cap on end-to-end evaluations per sample, and the precision a white-box attack solves in.
Evaluations = Annotated[int, Field(ge=1, le=10 ** 7)]
Dtype = Literal["float32", "float64"]


class Attack(Declared):
    """A reconstruction attack on the features sent at the cut. Its parameters are declared once, in the
    constructor's annotated signature (``splitnn.params``), and ``params`` lists them."""

    name: ClassVar[str] = "attack"
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset()

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        """Whether this attack makes sense against ``client`` behind ``defense``, and if not, why."""
        return True, ""

    def reconstruct(self, client: nn.Module, features: torch.Tensor, **ctx: Any) -> Reconstruction:
        """Recover the client's inputs from ``features``. ``ctx`` carries e.g. ``image_shape``, ``defense``
        (a ``PublicDefense``), never the true images. ``diagnostics["budget"]`` says what it spent."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def require_image_shape(ctx: dict[str, Any]) -> tuple[int, int, int]:
    """``image_shape`` from the context. Every attack reads it first, so this is also where a context that
    carries the true images is refused: no attacker has them (the evaluator scores the result afterwards)."""
    if "truth" in ctx:
        raise TypeError("reconstruct() got truth=: the true images never reach an attack; score the "
                        "reconstruction afterwards (e.g. attacks.peel.stage_input_errors for PEEL's blocks)")
    shape = ctx.get("image_shape")
    if shape is None or len(shape) != 3:
        raise ValueError("reconstruct() needs image_shape=(C, H, W) of the client's input")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def require_context(ctx: dict[str, Any], attack: str, *names: str) -> list[Any]:
    """The named context entries, or a clear error saying what the attack needs and why."""
    missing = [n for n in names if ctx.get(n) is None]
    if missing:
        raise ValueError(f"{attack} needs {', '.join(missing)} in reconstruct(...) (auxiliary=(images, labels), "
                         "query=images -> defended features, server=the server half); the runner passes them "
                         "by the attack's declared knowledge")
    return [ctx[n] for n in names]
