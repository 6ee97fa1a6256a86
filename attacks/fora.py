"""The substitute-client attacker of FORA (Xu et al., "A Stealthy Wrongdoer: Feature-Oriented Reconstruction
Attack against Split Learning", CVPR 2024) and SDAR (Zhu et al., NDSS 2025), scaled to CPU size.

What it knows: auxiliary images from the private data's distribution and the features the server observed,
i.e. those passed to ``reconstruct``. Not the client's weights (its architecture, as ``shadow``'s attacker
does), no queries to the client on chosen inputs, and by default not the server half either.

The algorithm: (1) a substitute client, the client's architecture with fresh seeded weights (``shadow``'s
``fresh_copy``: no weight of the target is read), trained with Adam so that its features of auxiliary batches
are distributed like the observed features, by a multi-kernel MMD between the two batches (FORA's
L_MK-MMD); (2) ``inverse_net``'s decoder trained on (substitute(aux), aux) pairs; (3) the decoder applied to
the observed features.

With ``discriminator_weight`` > 0 the substitute is also regularised adversarially, as FORA's L_DISC: a small
convolutional discriminator (``FeatureCritic``) learns, step by step with the substitute, to tell the observed
features from the substitute's, and the substitute pays ``discriminator_weight`` times the non-saturating GAN
loss of its features being told apart. SDAR's generator and its further regularisers are not implemented.
FORA collects smashed data over all of training; here the observed set is only the features of one
``reconstruct`` call (a handful of images per cell), so the substitute is fitted to few samples. The defense is
not modelled: the undefended substitute is matched to the defended features. With ``task_weight`` > 0 the
attacker also holds the server half (``Knowledge.SERVER_WEIGHTS``) and adds its cross-entropy on the auxiliary
labels, as ``shadow`` trains on alone.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Knowledge, Reconstruction, budget
from leakbench.attacks.cache import cached_module
from leakbench.attacks.inverse_net import Decoder, InverseNet
from leakbench.attacks.registry import register
from leakbench.attacks.shadow import INIT_NAMESPACE, fresh_copy, unresettable
from leakbench.splitnn.params import Count, NonNegative, Positive, PositiveCount, Seed
from leakbench.splitnn.progress import progress_bar


def mk_mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, multiplier: float = 2.0) -> torch.Tensor:
    """The biased MMD^2 between samples ``x`` (n, d) and ``y`` (m, d) under a sum of ``kernels`` Gaussian kernels
    exp(-|a - b|^2 / h) whose bandwidths h are ``multiplier ** (i - kernels // 2)`` times the mean pairwise
    squared distance of the pooled samples (held constant in the gradient), as in Long et al.'s DAN (2015)."""
    z = torch.cat([x, y])
    squares = z.pow(2).sum(dim=1)
    d2 = (squares[:, None] + squares[None, :] - 2 * z @ z.T).clamp_min(0)
    pairs = len(z) * (len(z) - 1)
    scale = (d2.detach().sum() / max(pairs, 1)).clamp_min(1e-12)
    k = torch.stack([torch.exp(-d2 / (scale * multiplier ** (i - kernels // 2))) for i in range(kernels)]).sum(0)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class FeatureCritic(nn.Module):
    """FORA's feature discriminator, CPU-sized: two stride-2 3x3 convolutions (LeakyReLU) and a linear logit on
    their average for image-shaped features (C, H, W); a two-layer MLP for flat ones. A logit per sample: high
    for features that look observed."""

    def __init__(self, feature_shape: tuple[int, ...], hidden: int = 32):
        super().__init__()
        if len(feature_shape) == 3:
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(feature_shape[0], hidden, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * hidden, 1))
        else:
            width = math.prod(feature_shape)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(width, 4 * hidden), nn.LeakyReLU(0.2),
                                     nn.Linear(4 * hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten()


def features_digest(features: torch.Tensor) -> str:
    """sha256 of the observed features' shape, dtype and values: the substitute is fitted to them, so they key
    its cache."""
    values = features.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(f"{tuple(features.shape)}:{features.dtype}:".encode() + values).hexdigest()


@register("fora")
class FORA(Attack):
    """A substitute client fitted by MK-MMD to the observed features' distribution on auxiliary images, inverted
    by a decoder trained on its (features, image) pairs; the decoder is applied to the observed features.

    A sample's reconstruction depends on the rest of its batch (the substitute is fitted to all of it), so it
    does not claim batch independence. Cached on disk per the runner's cache key, the attack's parameters and a
    hash of the observed features. ``discriminator_weight`` (0: the MMD alone) weighs FORA's adversarial term,
    its critic trained at ``discriminator_lr`` (module docstring). ``discriminator_weight`` 0.1 and
    ``substitute_epochs`` 20 were chosen by ``benchmarks/tune_attacks.py --attacks fora`` on the validation slice
    (mean 22.69 dB; the MMD alone at 20 epochs 22.55, at 10 epochs 21.82; weight 1.0 13.5-15.2: the critic,
    fitted to a handful of observed features, then dominates).
    """

    base_knowledge = frozenset({Knowledge.AUXILIARY_DATA})
    batch_independent = False

    def __init__(self, substitute_epochs: Count = 20, decoder_epochs: Count = 15, lr: Positive = 1e-3,
                 decoder_lr: Positive = 5e-3, batch_size: PositiveCount = 64, hidden: PositiveCount = 64,
                 kernels: PositiveCount = 5, task_weight: NonNegative = 0.0,
                 discriminator_weight: NonNegative = 0.1, discriminator_lr: Positive = 1e-3, seed: Seed = 0):
        self.substitute_epochs, self.decoder_epochs, self.lr, self.decoder_lr = substitute_epochs, decoder_epochs, \
            lr, decoder_lr
        self.batch_size, self.hidden, self.kernels, self.task_weight, self.seed = batch_size, hidden, kernels, \
            task_weight, seed
        self.discriminator_weight, self.discriminator_lr = discriminator_weight, discriminator_lr

    @property
    def knowledge(self) -> frozenset[Knowledge]:
        return self.base_knowledge | ({Knowledge.SERVER_WEIGHTS} if self.task_weight > 0 else set())

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        missing = unresettable(client)
        if missing:
            return False, f"the substitute cannot re-initialise {', '.join(missing)} (no reset_parameters)"
        return True, ""

    def train_substitute(self, substitute: nn.Module, images: torch.Tensor, observed: torch.Tensor,
                         labels: torch.Tensor | None = None, server: nn.Module | None = None,
                         bar: Any = None) -> list[float]:
        """Adam on mk_mmd(substitute(aux batch), observed batch) (+ ``task_weight`` x the frozen server's
        cross-entropy when ``server`` is given, + ``discriminator_weight`` x the adversarial term against a
        ``FeatureCritic`` trained one step before each substitute step); returns the mean loss of each epoch."""
        frozen = None
        if server is not None:
            frozen = copy.deepcopy(server).eval()
            for p in frozen.parameters():
                p.requires_grad_(False)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(substitute.parameters(), lr=self.lr)
        critic, critic_optimizer = None, None
        if self.discriminator_weight > 0:
            with torch.random.fork_rng(), torch.device("cpu"):  # initialised on the CPU: the same on every device
                torch.manual_seed(self.seed + 1)
                critic = FeatureCritic(tuple(observed.shape[1:]))
            critic = critic.to(observed.device)
            critic_optimizer = torch.optim.Adam(critic.parameters(), lr=self.discriminator_lr, betas=(0.5, 0.999))
        target = observed.flatten(1)
        losses = []
        substitute.train()
        for _ in range(self.substitute_epochs):
            order = torch.randperm(len(images), generator=generator, device="cpu").to(images.device)
            total = 0.0
            for i in range(0, len(images), self.batch_size):
                idx = order[i:i + self.batch_size]
                seen = torch.randperm(len(target), generator=generator, device="cpu")[:self.batch_size]
                seen = seen.to(target.device)
                optimizer.zero_grad()
                out = substitute(images[idx])
                loss = mk_mmd(out.flatten(1), target[seen], self.kernels)
                if frozen is not None and labels is not None:
                    loss = loss + self.task_weight * F.cross_entropy(frozen(out), labels[idx])
                if critic is not None and critic_optimizer is not None:
                    critic_step(critic, critic_optimizer, observed[seen], out.detach())
                    told = critic(out)  # the critic's gradient here is cleared by its next step
                    loss = loss + self.discriminator_weight * F.binary_cross_entropy_with_logits(
                        told, torch.ones_like(told))
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(images))
            if bar is not None:
                bar.update()
        return losses

    def fit(self, client: nn.Module, features: torch.Tensor, context: AttackContext
            ) -> tuple[nn.ModuleDict, dict[str, list[float]], bool]:
        """The trained ``{"substitute", "decoder"}`` (eval mode), the losses of each epoch (empty when loaded) and
        whether they came from the cache. Reads ``client`` only for its architecture (``fresh_copy``)."""
        shape = context.require("image_shape", by=self)
        aux_images, aux_labels = context.require("auxiliary", by=self)
        server = context.require("server", by=self) if self.task_weight > 0 else None
        device = features.device
        images, labels = aux_images.to(device).float(), aux_labels.to(device)
        observed = features.detach().float()
        substitute = fresh_copy(client, self.seed).float().to(device)  # the architecture; never the weights
        with torch.random.fork_rng(), torch.device("cpu"):  # initialised on the CPU: the same on every device
            torch.manual_seed(self.seed)
            decoder = Decoder(tuple(features.shape[1:]), shape, self.hidden)
        decoder = decoder.to(device)
        pair = nn.ModuleDict({"substitute": substitute, "decoder": decoder})
        losses: dict[str, list[float]] = {"substitute": [], "decoder": []}

        def train(_: nn.ModuleDict) -> None:  # trains ``pair``'s two modules in place
            with progress_bar(self.substitute_epochs + self.decoder_epochs, "FORA", unit="epoch") as bar:
                losses["substitute"] = self.train_substitute(substitute, images, observed, labels, server, bar)
                with torch.no_grad():
                    made = torch.cat([substitute.eval()(images[i:i + 256])
                                      for i in range(0, len(images), 256)])
                reads = []

                def substitute_features(_: torch.Tensor) -> torch.Tensor:
                    reads.append(1)  # train_decoder reads once to standardise, then once per epoch
                    if len(reads) > 1:
                        bar.update()
                    return made
                decoder_trainer = InverseNet(hidden=self.hidden, epochs=self.decoder_epochs, lr=self.decoder_lr,
                                             batch_size=self.batch_size, seed=self.seed)
                losses["decoder"] = decoder_trainer.train_decoder(decoder, images, substitute_features)

        key = None if context.cache_key is None else {
            "attack": self.name, **self.params, "init": INIT_NAMESPACE, "context": context.cache_key,
            "observed": features_digest(features)}
        pair, from_cache = cached_module(pair, self.name, key, context.cache_dir, train)
        return pair.eval(), losses, from_cache

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        start = time.perf_counter()
        pair, losses, from_cache = self.fit(client, features, context)
        aux_images = context.require("auxiliary", by=self)[0]
        observed = features.detach().float()
        with torch.no_grad():
            sample = aux_images[:256].to(features.device).float()
            substitute_mmd = float(mk_mmd(pair["substitute"](sample).flatten(1), observed.flatten(1), self.kernels))
            reconstructed = pair["decoder"](observed).to(features.dtype)
        seconds = time.perf_counter() - start
        none = torch.zeros(len(features), dtype=torch.long, device=features.device)  # the client is never run
        return Reconstruction(reconstructed, {"from_cache": from_cache, "train_losses": losses,
                                              "substitute_mmd": substitute_mmd, "observed": len(features),
                                              "auxiliary_images": len(aux_images), "seconds": seconds,
                                              "budget": budget(seconds, none, none)})


def critic_step(critic: nn.Module, optimizer: torch.optim.Optimizer, observed: torch.Tensor,
                made: torch.Tensor) -> float:
    """One Adam step of the critic: observed features labelled 1, the substitute's (detached) 0."""
    optimizer.zero_grad(set_to_none=True)
    real, fake = critic(observed), critic(made)
    loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) +
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    loss.backward()
    optimizer.step()
    return float(loss.detach())
