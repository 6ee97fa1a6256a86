"""What an attacker may know besides the features it receives: the vocabulary of threat models that attacks
declare and defenses deny."""
from __future__ import annotations

from enum import Enum


class Knowledge(str, Enum):
    """What an attacker is assumed to know besides the features it receives."""

    CLIENT_WEIGHTS = "client_weights"   # white-box: the client half's architecture and weights
    AUXILIARY_DATA = "auxiliary_data"   # samples from the same distribution as the private data
    QUERY_ACCESS = "query_access"       # can run the client half on inputs of its choice
    DEFENSE = "defense"                 # knows the defense's kind and public parameters
    SERVER_WEIGHTS = "server_weights"   # holds the server half (an honest-but-curious server does)
