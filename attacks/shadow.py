"""The query-free attacker (He, Zhang & Lee 2019): an honest-but-curious server that holds the server half
and auxiliary labelled data, but neither the client's weights nor query access. It trains a shadow client
(the client's architecture, fresh weights) through the frozen server half, then inverts the shadow."""
from __future__ import annotations

import copy
import hashlib
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Knowledge, Reconstruction
from leakbench.attacks.cache import cached_module
from leakbench.attacks.peel import PEEL
from leakbench.attacks.registry import register
from leakbench.attacks.rmle import RMLE
from leakbench.splitnn.params import Count, NonNegative, Positive, PositiveCount, Seed
from leakbench.splitnn.training import fit


#: The namespace of the shadow's initial-weight seeds. It is part of the cache key, so shadows trained from
#: another initialisation scheme are never served from the cache.
INIT_NAMESPACE = "shadow-client"


def shadow_init_seed(seed: int) -> int:
    """The torch seed of the shadow's initial weights: sha256 of ``"shadow-client:{seed}"`` with its top bit
    set. It lies in [2**63, 2**64), where no training seed does (configs use 0, 1, ...), so the shadow never
    replays the stream from which ``splitnn.train`` drew the target's initial weights."""
    digest = hashlib.sha256(f"{INIT_NAMESPACE}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") | (1 << 63)


def unresettable(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that no ``reset_parameters`` or
    ``reset_running_stats`` of their owner re-draws: a shadow would silently keep the target's values."""
    names = []
    for prefix, owner in module.named_modules():
        resets = hasattr(owner, "reset_parameters") or hasattr(owner, "reset_running_stats")
        if not resets:
            own = [n for n, _ in owner.named_parameters(recurse=False)] + \
                  [n for n, _ in owner.named_buffers(recurse=False)]
            names += [f"{prefix}.{n}" if prefix else n for n in own]
    return names


def reinitialise(module: nn.Module, torch_seed: int) -> nn.Module:
    """Re-draw every parameter and buffer of ``module`` in place under ``torch.manual_seed(torch_seed)``
    (the global RNG is restored after): each module's ``reset_parameters`` (PReLU's included) and
    ``reset_running_stats`` (BatchNorm's statistics). Raises TypeError if a tensor has no reset."""
    missing = unresettable(module)
    if missing:
        raise TypeError(f"cannot re-initialise {', '.join(missing)}: their modules have no reset_parameters")
    with torch.random.fork_rng():
        torch.manual_seed(torch_seed)
        for owner in module.modules():
            if hasattr(owner, "reset_parameters"):
                getattr(owner, "reset_parameters")()  # a method, not a tensor (nn.Module's __getattr__ says either)
            if hasattr(owner, "reset_running_stats"):
                getattr(owner, "reset_running_stats")()
    return module


def fresh_copy(client: nn.Module, seed: int) -> nn.Module:
    """The client's architecture with every parameter and buffer re-initialised from a seed stream disjoint
    from the target's (``shadow_init_seed``): what an attacker who knows the architecture but not the
    weights can build. Constant initialisations (BatchNorm's 1 and 0, PReLU's 0.25) are the architecture's,
    equal in any two untrained models; every randomly drawn tensor differs from the target's."""
    return reinitialise(copy.deepcopy(client), shadow_init_seed(seed))


@register("shadow")
class Shadow(Attack):
    """Shadow client trained so that ``server(shadow(x))`` classifies the auxiliary data (its features then
    mimic the client's), inverted with rMLE or PEEL (``inverter``) on the observed features.

    Cached on disk per the runner's cache key (model, cut, seed; the defense only when it changes the server
    half, since this attacker does not see it) and the attack's training parameters.
    """

    base_knowledge = frozenset({Knowledge.SERVER_WEIGHTS, Knowledge.AUXILIARY_DATA})

    def __init__(self, inverter: Literal["rmle", "peel"] = "rmle", epochs: Count = 10, lr: Positive = 0.05,
                 batch_size: PositiveCount = 64, iterations: PositiveCount = 300, tv_weight: NonNegative = 0.0,
                 seed: Seed = 0):
        self.inverter, self.epochs, self.lr, self.batch_size = inverter, epochs, lr, batch_size
        self.iterations, self.tv_weight, self.seed = iterations, tv_weight, seed

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
        missing = unresettable(client)
        if missing:
            return False, f"the shadow cannot re-initialise {', '.join(missing)} (no reset_parameters)"
        if self.inverter == "peel":
            return PEEL().supports(client, defense)
        return True, ""

    def train_shadow(self, shadow: nn.Module, server: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """SGD on the task loss of the frozen server half on top of the shadow client."""
        frozen = copy.deepcopy(server).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        fit(shadow, images, labels, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, weight_decay=5e-4,
            seed=self.seed, progress=False, loss=lambda m, x, y: F.cross_entropy(frozen(m(x)), y))

    def _key(self, context: AttackContext) -> dict[str, Any] | None:
        """The cache key: the runner's ``cache_key`` (it names the defense, as a hash, only when the granted
        server half depends on it: a fitted defense may fine-tune it) and the training parameters."""
        key = context.cache_key
        if key is None:
            return None
        return {"attack": self.name, **{k: v for k, v in self.params.items() if k in self._training_params},
                "init": INIT_NAMESPACE, "context": key}

    _training_params = ("epochs", "lr", "batch_size", "seed")

    def reconstruct(self, client: nn.Module, features: torch.Tensor, context: AttackContext) -> Reconstruction:
        shape = context.require("image_shape", by=self)
        (aux_images, aux_labels), server = context.require("auxiliary", "server", by=self)
        start = time.perf_counter()
        shadow, from_cache = cached_module(
            fresh_copy(client, self.seed), self.name, self._key(context), context.cache_dir,
            lambda s: self.train_shadow(s, server, aux_images, aux_labels))
        shadow.eval()
        with torch.no_grad():
            aux_accuracy = float((server(shadow(aux_images)).argmax(1) == aux_labels).float().mean())
        inverter: Attack = (RMLE(iterations=self.iterations, tv_weight=self.tv_weight) if self.inverter == "rmle"
                            else PEEL(max_iter=50, refine_iter=self.iterations, tv_weight=self.tv_weight))
        recon = inverter.reconstruct(shadow, features, AttackContext(image_shape=shape))  # white-box on the shadow
        seconds = time.perf_counter() - start
        recon.diagnostics = {"inverter": recon.diagnostics, "from_cache": from_cache,
                             "shadow_auxiliary_accuracy": aux_accuracy, "seconds": seconds}
        if "budget" in recon.diagnostics["inverter"]:  # the inversion's spend, timed with the shadow's training
            recon.diagnostics["budget"] = {**recon.diagnostics["inverter"]["budget"], "seconds": seconds}
        return recon
