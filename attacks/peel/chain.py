"""The client half as the composition of its stages: the end-to-end objective, and scoring each stage's
recovered input against the truth (for the evaluator, after the attack: the attack never sees the truth)."""
from __future__ import annotations

import torch
from torch import nn

from leakbench.attacks.priors import Forward, Loss, relu_consistency, squared_error
from leakbench.attacks.peel.stages import Stage, extract_stages


def chain(stages: list[Stage]) -> Forward:
    """The client half as the composition of its stages (BatchNorm folded)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = stage.forward(x)
        return x
    return forward


def pre_relu_forward(stages: list[Stage]) -> Forward | None:
    """The client half up to its final ReLU's input, when it ends in one (else None): what the fits that read the
    released zeros as inequalities evaluate."""
    last = stages[-1].pre_relu
    if last is None:
        return None
    head = chain(stages[:-1])
    return lambda x: last(head(x))


def end_to_end_loss(stages: list[Stage], observed: torch.Tensor) -> Loss:
    """PEEL's refinement loss, per sample: ``relu_consistency`` when the client ends in a ReLU (its zeros as
    inequalities, smooth where the pre-activation is still negative), else the plain squared error."""
    pre_relu = pre_relu_forward(stages)
    if pre_relu is None:
        return squared_error(chain(stages), observed)
    return relu_consistency(pre_relu, observed)


@torch.no_grad()
def stage_outputs(stages: list[Stage], images: torch.Tensor) -> list[torch.Tensor]:
    """The true output of every stage for ``images``."""
    outputs, x = [], images
    for stage in stages:
        x = stage.forward(x)
        outputs.append(x)
    return outputs


@torch.no_grad()
def true_input_errors(stages: list[Stage], recovered: list[torch.Tensor], truth: torch.Tensor) -> list[float]:
    """Relative error ||x̂_i - x_i|| / ||x_i|| of each stage's recovered input against the true one."""
    errors, x = [], truth.to(recovered[0].dtype)
    for stage, estimate in zip(stages, recovered):
        errors.append(float((estimate - x).norm() / x.norm().clamp_min(1e-30)))
        x = stage.forward(x)
    return errors


def stage_input_errors(client: nn.Module, image_shape: tuple[int, int, int], intermediates: list[torch.Tensor],
                       truth: torch.Tensor) -> list[float]:
    """For the evaluator: each stage's relative input error, from PEEL's ``Reconstruction.intermediates``
    (input side first) and the true images. The block-wise image MSE is then that of
    ``alternatives["blockwise"]`` (or of ``images`` when PEEL ran without refinement)."""
    stages = extract_stages(client, image_shape, intermediates[0].dtype)
    if len(stages) != len(intermediates):
        raise ValueError(f"{len(intermediates)} intermediates for a client of {len(stages)} stages")
    return true_input_errors(stages, intermediates, truth)

