"""The typed context an attack gets besides the features: one field per thing an attacker may be granted, so an
attack reads fields (never a ``**ctx`` bag) and what it was not granted is absent. There is no field for the
true images: the evaluator scores a reconstruction afterwards."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

from leakbench.contracts.knowledge import Knowledge

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The fields that knowledge grants (every other field, e.g. ``image_shape``, every attack gets).
GRANTS: dict[str, Knowledge] = {"defense": Knowledge.DEFENSE, "auxiliary": Knowledge.AUXILIARY_DATA,
                                "query": Knowledge.QUERY_ACCESS, "server": Knowledge.SERVER_WEIGHTS}

_MEANING = {"image_shape": "(C, H, W) of the client's input", "defense": "a PublicDefense",
            "auxiliary": "(images, labels)", "query": "images -> defended features",
            "server": "the server half", "cache_dir": "a folder", "cache_key": "the runner's identity of the cell"}


class MissingContext(ValueError):
    """An attack read a context field that is absent: not granted, or not passed in a library call."""


@dataclass(frozen=True)
class PublicDefense:
    """What a defense-aware attacker knows of the defense: its class, name, kind and public parameters.

    Never the defense object itself, whose random stream would let an attacker replay the exact noise. ``cls``
    is what defense-aware attacks look their observation model up by (``None``: not known).
    """

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    cls: type | None = None

    def __post_init__(self) -> None:  # a copy: nothing the attacker does reaches the defense's own parameters
        object.__setattr__(self, "params", copy.deepcopy(dict(self.params)))

    @classmethod
    def of(cls, defense: Any) -> "PublicDefense":
        """The public view of a Defense (``None``: no defense, class ``NoneType``); a PublicDefense as it is."""
        if isinstance(defense, PublicDefense):
            return defense
        if defense is None:
            return cls("none", "transform", {}, type(None))
        return cls(str(defense.name), str(defense.kind), dict(defense.params), type(defense))


@dataclass(frozen=True, eq=False)
class AttackContext:
    """What ``Attack.reconstruct(client, features, context)`` gets besides the features; ``None`` = absent.

    ``image_shape``, ``cache_dir`` and ``cache_key`` every attack may get; ``defense`` (a ``PublicDefense``; a
    Defense object passed here is reduced to one), ``auxiliary``, ``query`` and ``server`` only with the
    knowledge ``GRANTS`` names. The runner fills it in one place (``evaluation.attack_context``); a library
    call passes what it has, e.g. ``AttackContext(image_shape=(3, 32, 32))``.
    """

    image_shape: tuple[int, int, int] | None = None
    defense: PublicDefense | None = None
    auxiliary: "tuple[torch.Tensor, torch.Tensor] | None" = None
    query: "Callable[[torch.Tensor], torch.Tensor] | None" = None
    server: "nn.Module | None" = None
    cache_dir: str | None = None
    cache_key: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.image_shape is not None:
            shape = tuple(int(s) for s in self.image_shape)
            if len(shape) != 3:
                raise ValueError(f"image_shape must be (C, H, W) of the client's input, got {self.image_shape!r}")
            object.__setattr__(self, "image_shape", shape)
        if self.defense is not None:  # the defense's random state never reaches an attack
            object.__setattr__(self, "defense", PublicDefense.of(self.defense))

    def require(self, *names: str, by: Any = "the attack") -> Any:
        """The named fields (one value for one name, else a tuple), or MissingContext naming every absent one
        and the knowledge that grants it. ``by``, an Attack, must also declare that knowledge (TypeError if not:
        an attack that reads what it does not declare would get it from no runner)."""
        who = getattr(by, "name", str(by))
        declared = getattr(by, "knowledge", None)
        if declared is not None:
            undeclared = [n for n in names if n in GRANTS and GRANTS[n] not in declared]
            if undeclared:
                raise TypeError(f"{who} reads {', '.join(undeclared)} without declaring "
                                + ", ".join(f"Knowledge.{GRANTS[n].name}" for n in undeclared))
        unknown = [n for n in names if n not in _MEANING]
        if unknown:
            raise AttributeError(f"AttackContext has no field {unknown[0]!r}; fields: "
                                 + ", ".join(f.name for f in fields(self)))
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            needs = "; ".join(f"{n}={_MEANING[n]}" + (f" (granted by Knowledge.{GRANTS[n].name})" if n in GRANTS
                                                       else "") for n in missing)
            raise MissingContext(f"{who} needs {needs} in its AttackContext; the runner passes what the attack's "
                                 "declared knowledge grants (evaluation.attack_context)")
        values = tuple(getattr(self, n) for n in names)
        return values[0] if len(values) == 1 else values
