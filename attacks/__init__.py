"""Reconstruction attacks on the features sent at the cut; ``attacks.peel`` is the centrepiece."""
from attacks import inverse_net, rmle, shadow  # noqa: F401  (register the attacks)
from attacks.inverse_net import InverseNet
from attacks.base import Attack, AttackContext, Knowledge, PublicDefense, Reconstruction
from attacks.peel import PEEL
from attacks.registry import attack_class, get, names, register
from attacks.rmle import RMLE
from attacks.shadow import Shadow

__all__ = ["Attack", "AttackContext", "InverseNet", "Knowledge", "PublicDefense", "Reconstruction", "PEEL", "RMLE",
           "Shadow", "attack_class", "get", "names", "register"]
