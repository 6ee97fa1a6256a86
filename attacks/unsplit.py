"""UnSplit (Erdogan, Küpçü & Cicek, "UnSplit: Data-Oblivious Model Inversion, Model Stealing, and Label Inference
Attacks Against Split Learning", WPES 2022): an attacker that knows only the client's architecture recovers its
inputs and a stand-in for its weights at once, by alternating between fitting the images and fitting the copy."""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Dtype, Reconstruction, budget
from leakbench.attacks.optim import fit_input, relative_residual
from leakbench.attacks.priors import combined, least_norm, sum_per_sample, tv_prior
from leakbench.attacks.registry import register
from leakbench.attacks.shadow import fresh_copy, unresettable
from leakbench.splitnn.params import Count, NonNegative, Positive, PositiveCount, Seed
from leakbench.splitnn.progress import progress_bar


class Stolen(NamedTuple):
    """What one UnSplit run recovers: the images, the stolen client (the copy as fitted), and per sample (B,) the
    end-to-end iterations and evaluations it spent."""

    images: torch.Tensor
    client: nn.Module
    iterations: torch.Tensor
    evaluations: torch.Tensor


@register("unsplit")
class UnSplit(Attack):
    """Data-oblivious model inversion and stealing: no client weights, no auxiliary data, no queries.

    What it knows: the observed features and the client's architecture, which every attack handed the ``client``
    module has; its declared knowledge is empty. It never reads the client's weights: ``fresh_copy`` (the shadow
    attacker's helper) re-draws every parameter and buffer of a copy from ``seed`` (a stream disjoint from any
    training seed's), and the attack works on that copy alone, so its result is the same for any weights of the
    same architecture. A client with a tensor no ``reset_parameters`` re-draws is not supported.

    The algorithm (the paper's Algorithm 1): start from grey images (0.5) and the fresh copy, in eval mode (a
    BatchNorm then is a per-channel affine map that the fit learns). Each of ``rounds`` rounds
    (a) fits the images, ``image_steps`` iterations of the box-constrained L-BFGS every fit uses (one problem per
        sample, x in [0, 1]) on ``(0.5·||copy(x) - y||² + tv_weight·TV(x) + 0.5·l2_weight·||x||²) / ||y||²``
        (the paper's TV and l2 priors; TV here is the anisotropic one every fit uses), from the previous round's
        images (the curvature pairs restart, since the copy moved); then
    (b) fits the copy, ``model_steps`` steps of Adam (AMSGrad, ``lr``; the paper's optimiser) on the mean over
        samples of the same feature term without the prior, the images held fixed.
    ``model_steps=0`` inverts through the random copy (an ablation: what the fit of the copy adds).

    What it can recover: the features fix the images only up to what a copy with free weights can absorb (a
    filter, a mixing of the colour channels, the polarity), so the images are the truth seen through that
    ambiguity. On 8 held-out 16x16 digits, at the defaults, against the mean of 200 training digits (MSE 0.049):
    through the trained ResNet-20's stem conv (cut ``conv1``, one linear conv) it beats it, MSE 0.014 (0.166
    through the random copy alone); through a random ``conv1`` it is about level (0.04-0.07 over copy seeds); at
    every deeper cut tried (``bn1``, ``relu``, ``layer1.0``, ``layer1``; trained or random) it does not (0.10-0.51).
    Through a random cut after layer1 the features fit to 4% and the image MSE is 0.11: better than the grey start
    (0.14) and the random copy alone (0.20), not than the mean image (tests/attacks/test_unsplit.py).

    Scaled to a CPU: the paper runs 1000 rounds of 100 + 100 Adam steps per image; the defaults here are
    ``rounds=20`` of 10 L-BFGS iterations and 10 Adam steps. The paper attacks one image at a time with one
    clone; here the copy is shared by the batch, so a sample's reconstruction depends on the rest of its batch
    (``batch_independent`` is False). The budget counts, per sample, every L-BFGS iteration and evaluation plus
    one iteration and one evaluation per Adam step (a forward and backward of the whole batch through the copy).
    """

    base_knowledge = frozenset()
    #: The copy is fitted to every sample of the batch together, so the samples are coupled.
    batch_independent = False

    def __init__(self, rounds: PositiveCount = 20, image_steps: PositiveCount = 10, model_steps: Count = 10,
                 lr: Positive = 1e-3, tv_weight: NonNegative = 0.03, l2_weight: NonNegative = 0.1, seed: Seed = 0,
                 dtype: Dtype = "float32"):
        self.rounds, self.image_steps, self.model_steps, self.lr = rounds, image_steps, model_steps, lr
        self.tv_weight, self.l2_weight, self.seed, self.dtype = tv_weight, l2_weight, seed, dtype

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        missing = unresettable(client)
        if missing:
            return False, f"unsplit cannot re-initialise {', '.join(missing)} (no reset_parameters)"
        return True, ""

    def copy_of(self, client: nn.Module, device: torch.device) -> nn.Module:
        """The client's architecture with fresh weights from ``seed``: nothing of the target's weights is kept."""
        return fresh_copy(client, self.seed).to(device=device, dtype=getattr(torch, self.dtype)).eval()

    def steal(self, client: nn.Module, features: torch.Tensor, shape: tuple[int, int, int]) -> Stolen:
        """The alternating fit of images and copy to ``features`` (see the class); reads only ``client``'s
        architecture."""
        dtype = getattr(torch, self.dtype)
        target = features.detach().to(dtype)
        copy = self.copy_of(client, target.device)
        x = torch.full((len(target), *shape), 0.5, dtype=dtype, device=target.device)
        scale = 1.0 / sum_per_sample(target.pow(2)).clamp_min(1e-30)
        regulariser = combined(least_norm(self.l2_weight), tv_prior(self.tv_weight))
        optimizer = torch.optim.Adam(copy.parameters(), lr=self.lr, amsgrad=True)
        iterations = torch.zeros(len(target), dtype=torch.long, device=target.device)
        evaluations = torch.zeros_like(iterations)
        with progress_bar(self.rounds, "UnSplit", unit="round") as bar:
            for _ in range(self.rounds):
                copy.requires_grad_(False)
                fit = fit_input(copy, target, x, lower=0.0, upper=1.0, max_iter=self.image_steps,
                                regulariser=regulariser)
                x, iterations, evaluations = fit.x.detach(), iterations + fit.iterations, evaluations + fit.evaluations
                copy.requires_grad_(True)
                for _ in range(self.model_steps):
                    optimizer.zero_grad()
                    loss = (0.5 * sum_per_sample((copy(x) - target).pow(2)) * scale).mean()
                    loss.backward()
                    optimizer.step()
                iterations, evaluations = iterations + self.model_steps, evaluations + self.model_steps
                bar.update()
        copy.requires_grad_(False)
        return Stolen(x, copy, iterations, evaluations)

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        shape = context.require("image_shape", by=self)
        start = time.perf_counter()
        stolen = self.steal(client, features, shape)
        target = features.detach().to(stolen.images.dtype)
        residual = relative_residual(stolen.client, stolen.images, target)
        seconds = time.perf_counter() - start
        return Reconstruction(stolen.images.to(features.dtype), {
            "residual": residual, "rounds": self.rounds, "seconds": seconds,
            "budget": budget(seconds, stolen.iterations, stolen.evaluations)})
