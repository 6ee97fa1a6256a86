"""What the runner hands an attack besides the features: only what its declared knowledge entitles it to.

The auxiliary data is a fixed, seeded half of the *training* set (so it is disjoint from the attacked
test images; of a training set decoded on demand, at most AUXILIARY_LAZY_CAP images); the query oracle
runs the client and a copy of the defense whose random stream is independent of the one that defended the
attacked features.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from leakbench.attacks.base import Attack
from leakbench.contracts import GRANTS, AttackContext, Knowledge, PublicDefense
from leakbench.defenses.base import Defense
from leakbench.splitnn import devices
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.lazy_images import LAZY_ABOVE, Images, is_lazy
from leakbench.splitnn.training import config_hash

#: Fraction of the training set the attacker gets as auxiliary data.
AUXILIARY_FRACTION = 0.5
#: The most auxiliary images decoded from a training set decoded on demand (``lazy_images``): the attacks take
#: their auxiliary data as one tensor, so it is materialised, and only this much of it. Half of
#: ``LAZY_ABOVE``: under ``lazy: auto`` an in-memory training set never gives more, so only lazy sets are capped.
AUXILIARY_LAZY_CAP = LAZY_ABOVE // 2


def auxiliary_split(data: Dataset, seed: int, fraction: float = AUXILIARY_FRACTION,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``fraction`` of the training set (images, labels): the attacker's auxiliary data, as tensors on
    ``device`` (the split drawn on the CPU: the same images on every device). Of a lazy training set, the first
    AUXILIARY_LAZY_CAP images of the same seeded order (a prefix of what an in-memory copy would give), decoded
    now: never the whole set."""
    generator = torch.Generator().manual_seed(seed)
    count = int(fraction * len(data.x_train))
    if is_lazy(data.x_train):
        count = min(count, AUXILIARY_LAZY_CAP)
    index = torch.randperm(len(data.x_train), generator=generator)[:count]
    return data.x_train[index].to(device), data.y_train[index].to(device)


def query_oracle(client: nn.Module, defense: Defense, seed: int, batch_size: int = 256
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> defended features, through a copy of ``defense`` on its own random stream (so the noise an
    attacker sees on its queries never repeats the noise on the attacked features). The images go through in
    batches of ``batch_size`` (a lazy set is decoded a batch at a time), each moved to the client's device; the
    features come back whole, on that device."""
    oracle_defense = defense.reseeded(int(config_hash({"query_stream": seed}), 16) % (2 ** 31))
    device = devices.of(client)

    @torch.no_grad()
    def query(images: Images) -> torch.Tensor:
        return torch.cat([oracle_defense(client(images[i:i + batch_size].to(device)))
                          for i in range(0, len(images), batch_size)])
    return query


def denied(attack: Attack, defense: Defense) -> str:
    """Why ``attack`` cannot run behind ``defense`` (knowledge it needs that the defense denies), or ''."""
    missing = set(attack.knowledge) & set(defense.denies)
    if not missing:
        return ""
    names = ", ".join(sorted(k.value for k in missing))
    return f"{defense.name} denies the attacker {names}, which {attack.name} needs"


def attack_cache_key(attack: Attack, defense: Defense, defense_spec: dict[str, Any], identity: dict[str, Any]
                     ) -> dict[str, Any]:
    """What an attack's trained artefacts (decoders, shadow clients) depend on: ``identity`` (model, cut, seed),
    plus the defense when what the attack was granted depends on it (queries pass through it; a fitted defense
    may hand over a fine-tuned server half). The defense enters only as a hash, so the key tells the attacker
    nothing its knowledge does not grant."""
    key = dict(identity)
    if Knowledge.QUERY_ACCESS in attack.knowledge or (Knowledge.SERVER_WEIGHTS in attack.knowledge
                                                      and defense.needs_fit):
        key["defense"] = config_hash(defense_spec)
    return key


def attack_context(attack: Attack, *, data: Dataset, client: nn.Module, server: nn.Module, defense: Defense,
                   seed: int, cache_dir: str | None, cache_key: dict[str, Any]) -> AttackContext:
    """Everything ``reconstruct`` gets besides the features, in one place, granted by declared knowledge
    (``contracts.GRANTS``): ``image_shape``, ``cache_dir`` and ``cache_key`` (what identifies model, cut,
    defense and seed, for attack caches) always; ``defense`` (a ``PublicDefense``: class, kind and public
    parameters, never the object and its random stream) with DEFENSE; ``auxiliary`` (images, labels) with
    AUXILIARY_DATA; ``query`` (images -> defended features) with QUERY_ACCESS; ``server`` (the server half)
    with SERVER_WEIGHTS. What is not granted is absent (None); the true images have no field. The auxiliary data
    is put on the client's device, where the query oracle also runs."""
    provide: dict[str, Callable[[], Any]] = {
        "defense": lambda: PublicDefense.of(defense),
        "auxiliary": lambda: auxiliary_split(data, seed, device=devices.of(client)),
        "query": lambda: query_oracle(client, defense, seed), "server": lambda: server}
    granted = {name: provide[name]() for name, knowledge in GRANTS.items() if knowledge in attack.knowledge}
    return AttackContext(image_shape=data.shape, cache_dir=cache_dir, cache_key=cache_key, **granted)
