"""Reconstruction attacks on the features sent at the cut; ``attacks.peel`` is the centrepiece."""
from leakbench.attacks import inverse_net, rmle, shadow  # noqa: F401  (register the attacks)
from leakbench.attacks import peel_prior  # noqa: F401,E402  (registers peel_prior; imports PEEL and inverse_net)
from leakbench.attacks import fora  # noqa: F401,E402  (registers fora; imports inverse_net and shadow)
from leakbench.attacks.inverse_net import InverseNet
from leakbench.attacks.base import Attack, AttackContext, Knowledge, PublicDefense, Reconstruction
from leakbench.attacks.peel import PEEL
from leakbench.attacks.registry import attack_class, get, names, register
from leakbench.attacks.rmle import RMLE
from leakbench.attacks.shadow import Shadow
from leakbench.attacks.unsplit import UnSplit  # registers "unsplit"

__all__ = ["Attack", "AttackContext", "InverseNet", "Knowledge", "PublicDefense", "Reconstruction", "PEEL", "RMLE",
           "Shadow", "UnSplit", "attack_class", "get", "names", "register"]
