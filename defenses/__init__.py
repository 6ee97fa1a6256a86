"""Defenses that stand between the client and the server half."""
from defenses import noise  # noqa: F401  (registers the noise defenses)
from defenses.base import Defense
from defenses.registry import get, names, register

__all__ = ["Defense", "get", "names", "register"]
