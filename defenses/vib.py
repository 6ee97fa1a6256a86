"""A variational information bottleneck at the cut (Alemi et al., "Deep Variational Information Bottleneck",
ICLR 2017): the client's features are the mean of a Gaussian whose variance is learned, the server receives a
sample of it, in training and at inference, and training pays ``beta`` x its KL divergence from N(0, I)."""
from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from leakbench.defenses.base import TrainingDefense
from leakbench.defenses.noise import GAUSSIAN_INFORMATION, NoiseLaw
from leakbench.defenses.registry import register
from leakbench.splitnn.params import NonNegative, Seed
from leakbench.splitnn.split import split

#: The learned log-variance starts here (sigma = e^-2 ~ 0.14, against features of RMS ~1 at layer1 of an
#: initialised ResNet-20): training starts close to the plain model, as Alemi et al.'s softplus(x - 5) std does.
INITIAL_LOG_VARIANCE = -4.0


def per_channel(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) shaped (1, C, 1, ...) to broadcast against ``features`` (N, C, ...)."""
    return values.to(features).view(1, -1, *([1] * (features.dim() - 2)))


def gaussian_kl(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^log_variance) || N(0, 1)) per feature, averaged over all of them (``log_variance`` broadcast)."""
    log_variance = log_variance.expand_as(mean)
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).mean()


class _Bottleneck(nn.Module):
    """``server(mean + sigma * eps)`` with ``mean = client(x)``: the sample the server trains on, the mean kept for
    the KL term. ``eps`` comes from the training noise stream (no in-place ops: Opacus-safe)."""

    def __init__(self, client: nn.Module, server: nn.Module, log_variance: nn.Parameter,
                 noise: torch.Generator):
        super().__init__()
        self.client, self.server, self.log_variance, self.noise = client, server, log_variance, noise
        self.mean: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mean = self.client(x)
        eps = torch.randn(self.mean.shape, generator=self.noise, dtype=self.mean.dtype, device=self.mean.device)
        return self.server(self.mean + (0.5 * per_channel(self.log_variance, self.mean)).exp() * eps)


@register("vib")
class VIB(TrainingDefense):
    """Deep VIB at the cell's cut. The features ``f`` the client computes are the mean of ``N(f, diag(sigma^2))``
    with one learned ``sigma`` per channel (a homoscedastic encoder: sigma does not depend on the image); the
    server receives ``z = f + sigma * eps``, ``eps`` standard normal and fresh per call, and trains on it; the loss
    is ``cross_entropy + beta * KL(N(f, sigma^2) || N(0, 1))`` averaged over the features (so one ``beta`` means the
    same at any cut; Alemi et al. sum over them). The KL is the variational upper bound on the mutual information
    I(x; z) per feature: larger ``beta`` trades accuracy for less information at the cut.

    At inference the released features are the noisy sample ``z`` (the defense's own seeded stream; training draws
    from a second stream, seeded ``seed + 1``, so a trained and a cache-restored defense release the same noise).
    ``beta: 0`` is plain training exactly: no noise, no sigma, nothing added to the loop. Until it is trained
    (or restored) there is no sigma and the features pass as computed. The learned sigmas are kept in the report,
    so the checkpoint cache brings them back. Its ``noise_law`` gives ``evaluation.dfil`` its bound (fixed sigma
    per channel). Threat model: sigma is part of the trained client (known to an attacker with its weights), the
    noise is the defense's random state; it denies no knowledge. No formal guarantee.
    """

    uses_cut = True
    strength_zero = {"beta": 0.0}

    def __init__(self, beta: NonNegative = 0.01, seed: Seed = 0):
        super().__init__(seed)
        self.beta = beta
        #: The learned log-variance per channel (C,), float32 on the CPU; None before training or at beta 0.
        self.log_variance: torch.Tensor | None = None
        self._parameter: nn.Parameter | None = None
        self._kls: list[float] = []
        self._steps_per_epoch = 1

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int
             ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """At beta 0 the loop's own objects; else the model as client and server at the cut with the sampling
        between them, and the log-variance added to the optimizer (no weight decay: it is no weight; its learning
        rate C times the loop's)."""
        if self.beta == 0:
            return model, optimizer, loader
        if self.cut is None:
            raise ValueError("vib needs the cut at which to sample the features")
        client, server = split(model, self.cut)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # one image through the client for its channel count, without touching BatchNorm statistics
        with torch.no_grad():
            channels = client(loader.dataset[0][0].unsqueeze(0).to(device)).shape[1]
        model.train(was_training)
        self._parameter = nn.Parameter(torch.full((channels,), INITIAL_LOG_VARIANCE, device=device))
        # the loss averages over channels, so sigma_c's gradient is 1/C of what one sigma shared by every feature
        # would get: its step is C times the loop's, so it learns as fast at any channel count
        optimizer.add_param_group({"params": [self._parameter], "weight_decay": 0.0,
                                   "lr": optimizer.param_groups[0]["lr"] * channels})
        self._kls, self._steps_per_epoch = [], max(1, len(loader))
        noise = torch.Generator(device=device).manual_seed(self.seed + 1)
        return _Bottleneck(client, server, self._parameter, noise), optimizer, loader

    def loss_term(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  outputs: torch.Tensor) -> torch.Tensor | None:
        if self.beta == 0:
            return None
        bottleneck = cast(_Bottleneck, model)  # what wrap() returned, its mean that of this batch's forward pass
        kl = gaussian_kl(cast(torch.Tensor, bottleneck.mean), per_channel(bottleneck.log_variance,
                                                                          cast(torch.Tensor, bottleneck.mean)))
        self._kls.append(float(kl.detach()))
        return self.beta * kl

    def finish(self, model: nn.Module) -> dict[str, Any]:
        self.report = {"cut": self.cut, "beta": self.beta}
        if self._parameter is not None:
            last = self._kls[-self._steps_per_epoch:] or [0.0]
            self.log_variance = self._parameter.detach().float().cpu().clone()
            self.report.update(final_epoch_kl=sum(last) / len(last),
                               noise_std=[round(math.exp(0.5 * v), 6) for v in self.log_variance.tolist()],
                               log_variance=self.log_variance.tolist())  # exact: float32 -> float -> float32
            self._parameter = None
        self._generator = None  # inference noise starts from the seed, as after restore()
        return dict(self.report)

    def restore(self, report: dict[str, Any]) -> None:
        super().restore(report)
        values = report.get("log_variance")
        self.log_variance = None if values is None else torch.tensor(values, dtype=torch.float32)

    def std(self, features: torch.Tensor) -> torch.Tensor:
        """The noise's standard deviation, per channel, shaped to broadcast against ``features``."""
        if self.log_variance is None:
            raise RuntimeError("vib has no learned sigma before training (or at beta 0)")
        if self.log_variance.numel() != features.shape[1]:
            raise ValueError(f"vib was trained at a cut with {self.log_variance.numel()} channels, got features "
                             f"with {features.shape[1]}")
        return (0.5 * per_channel(self.log_variance, features)).exp()

    def noise_law(self) -> NoiseLaw | None:
        """The features plus ``sigma`` (per channel, fixed) times standard normal noise; None when no noise is
        added (beta 0, or not trained yet)."""
        if self.log_variance is None:
            return None
        return NoiseLaw(lambda features: features, self.std, *GAUSSIAN_INFORMATION)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The released features: a fresh sample ``f + sigma * eps`` from the defense's seeded stream."""
        if self.log_variance is None:
            return features
        eps = torch.randn(features.shape, generator=self.generator(features.device), dtype=features.dtype,
                          device=features.device)
        return features + self.std(features) * eps
