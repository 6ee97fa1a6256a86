"""Shredder-style learned noise (Mireshghallah et al., ASPLOS 2020): additive noise at the cut whose shape is
learned on training data, with the server frozen, to put the noise where the server's task needs the features
least; a fresh draw from the learned distribution per call."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from leakbench.defenses.base import FeatureDefense, sampled_features
from leakbench.defenses.noise import GAUSSIAN_INFORMATION, NoiseLaw
from leakbench.defenses.registry import register
from leakbench.splitnn.batch import per_sample
from leakbench.splitnn.datasets import Images
from leakbench.splitnn.params import NonNegative, Positive, PositiveCount, Seed

Unit = Annotated[float, Field(ge=0, le=1)]


@register("learned_noise")
class LearnedNoise(FeatureDefense):
    """Adds zero-mean Gaussian noise ``scale * RMS(f) * w * eps`` to each sample's features ``f``: ``eps`` is
    standard normal, drawn fresh per call from the defense's seeded stream, and ``w >= 0`` is a learned gain per
    feature (``per: element``, of shape (C, H, W)) or per channel (``per: channel``), with mean(w^2) = 1. So the
    expected noise power is exactly that of ``gaussian_noise`` at the same ``scale`` (relative); only where the
    noise goes is learned. ``scale`` is the noise-to-signal target: 0 is no noise (strength 0).

    ``w^2 = floor^2 + (1 - floor^2) * n * softmax(theta)`` over the n gains: ``floor: 1`` is fixed Gaussian noise;
    lower floors let the noise leave the features the server needs, down to ``floor: 0`` (Shredder's freedom,
    where it may gather on a few features and leave the rest clean). ``fit`` learns ``theta`` (0 at the start:
    uniform) by minimising the frozen server's cross-entropy on noisy features of ``samples`` training images,
    ``epochs`` epochs of Adam at ``lr``. This is Shredder's trade-off in its constrained form: Shredder
    maximises the noise's magnitude with a weight lambda on it; here the magnitude is fixed and the accuracy
    maximised, so the strength is one number comparable with every other noise defense.

    Threat model: ``w`` and the noise are the defense's random state, never given to an attacker (a
    defense-aware attacker knows ``scale``, ``per`` and ``floor``); it denies no knowledge. The noise is zero
    mean, so its whole magnitude is randomness (a learned offset would add magnitude an attacker could learn
    to subtract). Its ``noise_law`` (per-feature Gaussian std) gives ``evaluation.dfil`` its bound.
    """

    needs_fit = True
    strength_zero = {"scale": 0.0}

    def __init__(self, scale: NonNegative = 1.0, per: Literal["element", "channel"] = "element",
                 floor: Unit = 0.25, epochs: PositiveCount = 5, lr: Positive = 0.05, samples: PositiveCount = 2048,
                 seed: Seed = 0):
        super().__init__(seed)
        self.scale, self.per, self.floor = scale, per, floor
        self.epochs, self.lr, self.samples = epochs, lr, samples
        self.gain: torch.Tensor | None = None

    def gains(self, theta: torch.Tensor) -> torch.Tensor:
        """``w`` from the logits ``theta`` (any shape): non-negative, mean(w^2) = 1, w >= floor."""
        shares = theta.numel() * torch.softmax(theta.flatten(), dim=0).view_as(theta)
        return (self.floor ** 2 + (1 - self.floor ** 2) * shares).sqrt()

    def std(self, features: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """The noise's standard deviation per feature, ``scale * RMS(f) * w``: differentiable in the features (the
        noise is relative to their scale), broadcast per sample."""
        rms = features.flatten(1).pow(2).mean(dim=1).sqrt()
        return per_sample(self.scale * rms, features) * gain

    def noise_law(self) -> NoiseLaw | None:
        """The features plus ``std(f)`` times standard normal noise (``evaluation.dfil``); None at scale 0."""
        if self.scale == 0:
            return None
        gain = self.fitted_gain()
        return NoiseLaw(lambda features: features, lambda features: self.std(features, gain.to(features)),
                        *GAUSSIAN_INFORMATION)

    def fit(self, client: nn.Module, server: nn.Module, x_train: Images,
            y_train: torch.Tensor) -> nn.Module:
        """Learn the gains on a seeded subset of the training data with the server frozen; the server is returned
        as it is (Shredder never retrains it)."""
        if self.scale == 0:
            return server
        clean, labels, generator = sampled_features(client, server, x_train, y_train, self.samples, self.seed)
        shape = clean.shape[1:] if self.per == "element" else (clean.shape[1],) + (1,) * (clean.dim() - 2)
        theta = torch.zeros(shape, device=clean.device, requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=self.lr)
        noise_stream = torch.Generator(device=clean.device).manual_seed(self.seed + 1)
        losses = []
        for _ in range(self.epochs):
            order = torch.randperm(len(clean), generator=generator)
            for i in range(0, len(order), 64):
                batch = order[i:i + 64]
                f = clean[batch]
                eps = torch.randn(f.shape, generator=noise_stream, dtype=f.dtype, device=f.device)
                loss = F.cross_entropy(server(f + self.std(f, self.gains(theta)) * eps), labels[batch])
                # only theta's gradient: the frozen server's parameters are never touched
                (theta.grad,) = torch.autograd.grad(loss, [theta])
                optimizer.step()
                losses.append(float(loss.detach()))
        self.gain = self.gains(theta.detach())
        power = self.gain.pow(2).flatten()
        top = torch.sort(power, descending=True).values.cumsum(0)
        self.report = {"first_epoch_loss": round(sum(losses[:len(losses) // self.epochs]) /
                                                 max(1, len(losses) // self.epochs), 4),
                       "last_epoch_loss": round(sum(losses[-(len(losses) // self.epochs):]) /
                                                max(1, len(losses) // self.epochs), 4),
                       "max_gain": round(float(self.gain.max()), 4),
                       # how concentrated the noise is: the fraction of the gains that hold half its power
                       "half_power_fraction": round(float((top < 0.5 * top[-1]).sum() + 1) / len(power), 4)}
        return server

    def fitted_gain(self) -> torch.Tensor:
        if self.gain is None:
            raise RuntimeError("learned_noise must be fitted first: call fit(client, server, x_train, y_train) "
                               "(the runner does this for you)")
        return self.gain

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return features
        gain = self.fitted_gain()
        expected = tuple(features.shape[1:]) if self.per == "element" else (features.shape[1],)
        if tuple(gain.shape[:len(expected)]) != expected:
            raise ValueError(f"learned_noise was fitted on features of shape {tuple(gain.shape)}, got "
                             f"{tuple(features.shape[1:])}")
        eps = torch.randn(features.shape, generator=self.generator(features.device), dtype=features.dtype,
                          device=features.device)
        return features + self.std(features, gain.to(features)) * eps
