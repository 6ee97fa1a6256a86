"""The Attack base: what an attacker knows, which cells it applies to, and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from leakbench.contracts import AttackContext, Knowledge, PublicDefense
from leakbench.splitnn.params import Declared

__all__ = ["Attack", "AttackContext", "BUDGET_KEYS", "Dtype", "Evaluations", "Knowledge", "PublicDefense",
           "Reconstruction", "budget"]


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
    #: What every instance knows; ``knowledge`` adds what its parameters add (e.g. PEEL's ``adaptive``).
    base_knowledge: ClassVar[frozenset[Knowledge]] = frozenset()
    #: Whether ``Reconstruction.intermediates`` holds every stage's recovered input, so the evaluator scores
    #: each block against the truth (PEEL's chain) and the depth figure plots it.
    reports_block_errors: ClassVar[bool] = False

    @property
    def knowledge(self) -> frozenset[Knowledge]:
        """What this attack, with these parameters, knows: the context the runner grants it."""
        return self.base_knowledge

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        """Whether this attack makes sense against ``client`` behind ``defense``, and if not, why."""
        return True, ""

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        """Recover the client's inputs from ``features``. ``context`` holds what the attack's knowledge grants
        (``context.require(..., by=self)`` reads a field or says what is missing), never the true images.
        ``diagnostics["budget"]`` says what it spent."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
