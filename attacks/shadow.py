"""The query-free attacker (He, Zhang & Lee 2019): an honest-but-curious server that holds the server half
and auxiliary labelled data, but neither the client's weights nor query access. It trains a shadow client
(the client's architecture, fresh weights) through the frozen server half, then inverts the shadow."""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, Knowledge, Reconstruction, require_context, require_image_shape
from attacks.cache import cached_module
from attacks.peel import PEEL
from attacks.registry import register
from attacks.rmle import RMLE
from splitnn.errors import check_choice, check_number
from splitnn.training import fit


def fresh_copy(client: nn.Module, seed: int) -> nn.Module:
    """The client's architecture with every parameter and BatchNorm statistic re-initialised (seeded): what
    an attacker who knows the architecture but not the weights can build."""
    shadow = copy.deepcopy(client)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in shadow.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return shadow


@register("shadow")
class Shadow(Attack):
    """Shadow client trained so that ``server(shadow(x))`` classifies the auxiliary data (its features then
    mimic the client's), inverted with rMLE or PEEL (``inverter``) on the observed features.

    Cached on disk per (model, cut, seed, attack parameters); the defense enters the key only when it
    changes the server half (a fitted defense may fine-tune it), since this attacker does not see it.
    """

    knowledge = frozenset({Knowledge.SERVER_WEIGHTS, Knowledge.AUXILIARY_DATA})

    def __init__(self, inverter: str = "rmle", epochs: int = 10, lr: float = 0.05, batch_size: int = 64,
                 iterations: int = 300, tv_weight: float = 0.0, seed: int = 0):
        self.inverter = check_choice("inverter", inverter, ("rmle", "peel"))
        self.epochs = check_number("epochs", epochs, low=0, integer=True)
        self.lr = float(check_number("lr", lr, low=0, low_open=True))
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.iterations = check_number("iterations", iterations, low=1, integer=True)
        self.tv_weight = float(check_number("tv_weight", tv_weight, low=0))
        self.seed = check_number("seed", seed, low=0, integer=True)

    @property
    def params(self) -> dict[str, Any]:
        return {"inverter": self.inverter, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "iterations": self.iterations, "tv_weight": self.tv_weight, "seed": self.seed}

    def supports(self, client: nn.Module, defense: Any = None) -> tuple[bool, str]:
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

    def _key(self, ctx: dict[str, Any], defense: Any) -> dict[str, Any] | None:
        key = ctx.get("cache_key")
        if key is None:
            return None
        shared = {k: v for k, v in key.items() if k != "defense"}
        if getattr(defense, "needs_fit", False):  # the defense may have handed over a fine-tuned server half
            shared["defense"] = key.get("defense")
        return {"attack": self.name, **{k: v for k, v in self.params.items() if k in self._training_params},
                "context": shared}

    _training_params = ("epochs", "lr", "batch_size", "seed")

    def reconstruct(self, client: nn.Module, features: torch.Tensor, **ctx: Any) -> Reconstruction:
        shape = require_image_shape(ctx)
        (aux_images, aux_labels), server = require_context(ctx, self.name, "auxiliary", "server")
        start = time.perf_counter()
        shadow, from_cache = cached_module(
            fresh_copy(client, self.seed), self.name, self._key(ctx, ctx.get("defense")), ctx.get("cache_dir"),
            lambda s: self.train_shadow(s, server, aux_images, aux_labels))
        shadow.eval()
        with torch.no_grad():
            aux_accuracy = float((server(shadow(aux_images)).argmax(1) == aux_labels).float().mean())
        inverter: Attack = (RMLE(iterations=self.iterations, tv_weight=self.tv_weight) if self.inverter == "rmle"
                            else PEEL(max_iter=50, refine_iter=self.iterations, tv_weight=self.tv_weight))
        recon = inverter.reconstruct(shadow, features, image_shape=shape)
        recon.diagnostics = {"inverter": recon.diagnostics, "from_cache": from_cache,
                             "shadow_auxiliary_accuracy": aux_accuracy, "seconds": time.perf_counter() - start}
        return recon
