"""The contracts every package imports downward (it imports nothing of ours): what an attacker may know
(``Knowledge``) and the typed context an attack receives (``AttackContext``, ``PublicDefense``)."""
from contracts.attack_context import GRANTS, AttackContext, MissingContext, PublicDefense
from contracts.knowledge import Knowledge

__all__ = ["GRANTS", "AttackContext", "Knowledge", "MissingContext", "PublicDefense"]
