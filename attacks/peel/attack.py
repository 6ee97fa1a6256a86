"""PEEL (Arif et al., SaTML 2025): invert the client half block by block, from the cut back to the image."""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Dtype, Evaluations, Knowledge, Reconstruction, budget
from leakbench.attacks.optim import END_TO_END_HISTORY, MultiStartFit, fit_from_starts, relative_residual
from leakbench.attacks.peel.adaptive import invert_stage_adaptive, refine_adaptive
from leakbench.attacks.peel.observation import Exact
from leakbench.attacks.peel.readers import read_defense
from leakbench.attacks.peel.chain import chain, end_to_end_loss
from leakbench.attacks.peel.paper_solver import invert_stage_paper
from leakbench.attacks.peel.solver import invert_stage
from leakbench.attacks.peel.stages import Stage, UnsupportedLayerError, build_stages, extract_stages
from leakbench.attacks.priors import tv_prior
from leakbench.attacks.registry import register
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.params import Count, NonNegative, Seconds
from leakbench.splitnn.progress import progress_bar


def stage_bounds(stages: list[Stage], index: int) -> tuple[float | None, float | None]:
    """Bounds on a stage's input: the image is in [0, 1]; after a ReLU the input is >= 0."""
    if index == 0:
        return 0.0, 1.0
    return (0.0 if stages[index - 1].output_nonnegative else None), None


@register("peel")
class PEEL(Attack):
    """Backward, block-by-block inversion of a residual client half, then (by default) an end-to-end polish.

    Each stage is solved on its own and its recovered input becomes the previous stage's
    target, from the cut back to the image. ``solver="default"`` warm-starts each stage
    (x ≈ y through an identity shortcut, the shortcut's least-squares inverse through a strided
    one), iterates ``x <- y - W2·ReLU(W1·x)`` on identity blocks and polishes with a batched
    box-constrained L-BFGS under the ReLU-implied bounds (``block_iter`` iterations per block,
    ``max_iter`` per layer group such as the stem). Few block iterations are on purpose: where a block
    drops information (the zeros of a ReLU after the addition, a stride) its target is only the next
    block's estimate, and fitting it exactly amplifies that error along the chain; for the same reason
    ``prior_weight`` adds a least-norm prior on blocks with a ReLU after the addition (1.0 weighs it
    like the data term). ``prior_weight``, ``also_from_grey`` and the refinement's ``tv_weight`` (0.3) were
    chosen by ``benchmarks/tune_attacks.py`` on the validation slice of the test split, which no
    experiment reports.
    ``solver="paper"`` is the authors' (x, p, n) formulation with their Adam schedule. With ``refine``
    the block-wise image starts an end-to-end fit of the image through the whole client half (the same
    objective as rMLE), so PEEL starts where block-wise inversion left off rather than from a grey
    image; with ``also_from_grey`` a second fit from rMLE's grey start runs too and, per sample, the one
    whose features match that sample's observation better wins (no ground truth is used), so refined
    PEEL is never behind rMLE on its own objective.
    ``refine=False`` is pure block-wise PEEL. Every fit is ``attacks.box_lbfgs``, one problem per sample.
    ``max_evaluations`` caps the refinement's end-to-end evaluations per sample (split across its starts),
    ``max_seconds`` the whole attack's wall time (the refinement gets what the block-wise stage left).

    The result's ``intermediates`` are the recovered inputs of every stage (input side first), for the
    evaluator's per-block errors (``attacks.peel.stage_input_errors``); PEEL never sees the truth.

    ``adaptive=True`` is defense-aware PEEL (knowledge adds DEFENSE): it reads the context's ``defense`` (a
    ``PublicDefense``: class, kind and public parameters) by the reader registered for its class and fits what
    the defense released instead of an exact fit (``attacks.peel.readers``, ``attacks.peel.observation``;
    ``tv_prior`` is the rate β of its TV prior). A defense without a reader gets plain PEEL, and
    ``diagnostics["adaptive"]`` says so.

    Library use: ``attacks.get("peel").reconstruct(client, features, AttackContext(image_shape=(3, 32, 32)))``.
    """

    base_knowledge = frozenset({Knowledge.CLIENT_WEIGHTS})
    reports_block_errors = True

    def __init__(self, solver: Literal["default", "paper"] = "default", refine: bool = True,
                 max_iter: Count = 300, fixed_point_iters: Count = 100, refine_iter: Count = 500,
                 tv_weight: NonNegative = 0.3, also_from_grey: bool = True, prior_weight: NonNegative = 1.0,
                 block_iter: Count = 10, dtype: Dtype = "float64", adaptive: bool = False, tv_prior: NonNegative = 5.0,
                 max_evaluations: Evaluations | None = None, max_seconds: Seconds | None = None):
        self.solver, self.refine, self.max_iter, self.block_iter = solver, refine, max_iter, block_iter
        self.fixed_point_iters, self.refine_iter, self.tv_weight = fixed_point_iters, refine_iter, tv_weight
        self.also_from_grey, self.prior_weight, self.dtype = also_from_grey, prior_weight, dtype
        self.adaptive, self.tv_prior, self.max_seconds = adaptive, tv_prior, max_seconds
        if max_evaluations is not None and also_from_grey and max_evaluations < 2:
            raise ParameterError("max_evaluations", max_evaluations, "at least 2 with also_from_grey (one per start)")
        self.max_evaluations = max_evaluations

    @property
    def knowledge(self) -> frozenset[Knowledge]:
        """Plain PEEL knows the client's weights; the defense-aware variant also knows the defense."""
        return self.base_knowledge | ({Knowledge.DEFENSE} if self.adaptive else frozenset())

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        try:
            build_stages(client)
        except UnsupportedLayerError as exc:
            return False, str(exc)
        return True, ""

    def _invert(self, stage: Stage, target: torch.Tensor, lower: float | None, upper: float | None,
                reading: Exact | None = None, at_cut: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        if reading is not None and reading.changes_fit and (at_cut or reading.every_stage):
            return invert_stage_adaptive(stage, target, reading, at_cut=at_cut, lower=lower, upper=upper,
                                         max_iter=self.max_iter)
        if self.solver == "paper":
            return invert_stage_paper(stage, target, lower=lower, upper=upper)
        return invert_stage(stage, target, lower=lower, upper=upper,
                            max_iter=self.block_iter if stage.kind == "block" else self.max_iter,
                            fixed_point_iters=self.fixed_point_iters, prior_weight=self.prior_weight)

    def invert_stages(self, stages: list[Stage], observed: torch.Tensor, reading: Exact | None = None
                      ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """The block-wise stage: each stage's recovered input (input side first) and its diagnostics, solved
        from the cut back to the image, each stage's target the input recovered for the next one."""
        diagnostics: list[dict[str, Any]] = [{} for _ in stages]
        recovered: list[torch.Tensor] = [observed] * len(stages)
        target = observed
        with progress_bar(len(stages), "PEEL stages", unit="stage") as bar:
            for index in reversed(range(len(stages))):
                lower, upper = stage_bounds(stages, index)
                target, diagnostics[index] = self._invert(stages[index], target, lower, upper, reading,
                                                          at_cut=index == len(stages) - 1)
                recovered[index] = target
                bar.update()
        return recovered, diagnostics

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        shape = context.require("image_shape", by=self)
        dtype = getattr(torch, self.dtype)
        start = time.perf_counter()
        stages = extract_stages(client, shape, dtype)
        observed = features.detach().to(dtype)
        reading = read_defense(context.require("defense", by=self), observed) if self.adaptive else None
        recovered, stage_diagnostics = self.invert_stages(stages, observed, reading)
        blockwise = recovered[0].clamp(0.0, 1.0)
        forward = chain(stages)
        diagnostics: dict[str, Any] = {
            "stages": stage_diagnostics, "solver": self.solver,
            "blockwise_residual": relative_residual(forward, blockwise, observed),
            "iterations": sum(d["lbfgs_iterations"] + d.get("adam_iterations", 0) for d in stage_diagnostics)}
        if reading is not None:
            diagnostics["adaptive"] = reading.diagnostics()
        images, fit = blockwise, None
        if self.refine:
            fit = self._refine(stages, observed, blockwise, reading, start)
            images = fit.x
            diagnostics.update({"refine_start": fit.chosen,
                                "refined_residual": relative_residual(forward, images, observed),
                                "refine_residuals": {k: f.residual for k, f in fit.fits.items()},
                                "refine_seconds": fit.seconds})
            if reading is not None and reading.changes_fit:
                diagnostics["refine_objectives"] = {k: float(v.mean()) for k, v in fit.scores.items()}
            diagnostics["iterations"] += int(fit.iterations.max())
        seconds = time.perf_counter() - start
        zeros = torch.zeros(len(observed), dtype=torch.long, device=observed.device)
        diagnostics["seconds"] = seconds
        diagnostics["budget"] = budget(seconds, fit.iterations if fit else zeros, fit.evaluations if fit else zeros,
                                       torch.tensor([d["evaluations"] for d in stage_diagnostics], device="cpu").sum(0))
        return Reconstruction(images.to(features.dtype), diagnostics,
                              {"blockwise": blockwise.to(features.dtype)} if self.refine else {},
                              intermediates=[r.detach() for r in recovered])

    def _refine(self, stages: list[Stage], observed: torch.Tensor, blockwise: torch.Tensor,
                reading: Exact | None, start: float) -> MultiStartFit:
        """End-to-end fits of the image from the block-wise image (and grey); each sample keeps the better."""
        starts = {"blockwise": blockwise}
        if self.also_from_grey:
            starts["grey"] = torch.full_like(blockwise, 0.5)
        left = None if self.max_seconds is None else max(self.max_seconds - (time.perf_counter() - start), 0.0)
        if reading is not None and reading.changes_fit:  # the start whose fit has the lower objective wins
            return refine_adaptive(stages, reading, starts, iterations=self.refine_iter, tv_weight=self.tv_weight,
                                   tv_prior=self.tv_prior, max_evals=self.max_evaluations, max_seconds=left)
        regulariser = tv_prior(self.tv_weight)
        # Per sample, the fit whose features match that sample's observation better.
        return fit_from_starts(chain(stages), observed, starts, max_evals=self.max_evaluations, max_seconds=left,
                               lower=0.0, upper=1.0, max_iter=self.refine_iter, regulariser=regulariser,
                               data_loss=end_to_end_loss(stages, observed), history=END_TO_END_HISTORY)
