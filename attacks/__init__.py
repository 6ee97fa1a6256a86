"""Reconstruction attacks on the features sent at the cut; ``attacks.peel`` is the centrepiece."""
from attacks import rmle  # noqa: F401  (registers rmle)
from attacks.base import Attack, Knowledge, Reconstruction
from attacks.peel import PEEL
from attacks.registry import get, names, register
from attacks.rmle import RMLE

__all__ = ["Attack", "Knowledge", "Reconstruction", "PEEL", "RMLE", "get", "names", "register"]
