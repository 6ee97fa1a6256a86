"""The contracts every package imports downward (it imports nothing of ours): what an attacker may know
(``Knowledge``) and the typed context an attack receives (``AttackContext``, ``PublicDefense``)."""
from leakbench.contracts.attack_context import GRANTS, AttackContext, MissingContext, PublicDefense
from leakbench.contracts.knowledge import Knowledge

__all__ = ["GRANTS", "AttackContext", "Knowledge", "MissingContext", "PublicDefense"]
