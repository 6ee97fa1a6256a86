"""Parameters declared once: a constructor's annotated signature gives each parameter's name, type, bounds
and default, and from it come validation (pydantic), ``params`` (what a result row records), the config
schema and the CLI listing.

    class TopK(Defense):
        def __init__(self, keep: Annotated[float, Field(gt=0, le=1)] = 0.1, seed: Seed = 0): ...

A class that derives from ``Declared`` has its ``__init__`` arguments checked before its body runs; a bad
one raises ``ParameterError`` naming it. What the body still checks is what no single annotation can say
(one parameter against another).
"""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import ErrorDetails

from leakbench.splitnn.errors import ParameterError

#: Strict types (true is not 1, "1" is not a number), finite numbers, nothing unknown.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
#: A probability that must leave something: 0 <= p < 1.
Fraction = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=0)]
PositiveCount = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2 ** 63)]  # below 2^63: seeds are stored as SQLite INTEGERs
Seconds = Annotated[float, Field(gt=0, le=86_400)]


@functools.cache
def signature_model(factory: Callable[..., Any], exclude: frozenset[str] = frozenset()) -> type[BaseModel]:
    """The pydantic model of a factory's (or class's) keyword parameters, from its annotated signature."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    target = getattr(target, "__wrapped__", target)
    hints = typing.get_type_hints(target, include_extras=True)
    fields: dict[str, Any] = {}
    open_ended = False  # a **kwargs factory (e.g. torchvision's builders) takes keys it does not declare
    for param in inspect.signature(target).parameters.values():
        open_ended |= param.kind is param.VAR_KEYWORD
        if param.name in ("self", *exclude) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    name = getattr(factory, "__name__", "factory")
    config = ConfigDict(**{**STRICT, "extra": "allow"}) if open_ended else STRICT
    return create_model(f"{name}_params", __config__=config, **fields)


_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "finite_number": "a finite number", "dict_type": "a mapping", "list_type": "a list",
    "missing": "this key to be present",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def expected_of(error: ErrorDetails) -> str:
    """What a pydantic error says was expected, in the words of leakbench's other messages."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if "[key]" in error["loc"]:
        return "a string as the key (names are strings)"
    if kind in _BOUNDS:
        return f"a value {_BOUNDS[kind]} {next(iter(ctx.values()))}"
    if kind == "too_long":
        return f"at most {ctx['max_length']} items"
    if kind == "too_short":
        return f"at least {ctx['min_length']} item" + ("s" if ctx["min_length"] != 1 else "")
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    message = error["msg"].removeprefix("Input should be ")
    return message[0].lower() + message[1:]


def first_error(exc: ValidationError) -> ParameterError:
    """A pydantic ValidationError as a ParameterError naming the first bad parameter."""
    error = exc.errors(include_url=False)[0]
    key = ".".join(str(part) for part in error["loc"] if part != "[key]") or "params"
    return ParameterError(key, error.get("input"), expected_of(error))


class Declared:
    """Mixin: ``__init__``'s annotated signature is the declaration of the parameters (see the module)."""

    #: Parameters the constructor takes that ``params`` leaves out (e.g. a defense's seed: the cell gives it).
    unlisted: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _validating(cls.__init__)  # type: ignore[method-assign]

    @classmethod
    def declared(cls) -> list[str]:
        """The names of the parameters, in signature order."""
        # a class object is Hashable, but mypy does not see it (python/mypy#11470)
        return list(signature_model(cls).model_fields)  # type: ignore[arg-type]

    @property
    def params(self) -> dict[str, Any]:
        """The public parameters that define this object (what goes into a result row), as resolved by the
        constructor (e.g. a default that depends on another parameter)."""
        return {name: getattr(self, name) for name in self.declared() if name not in self.unlisted}


def _validating(init: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            unknown = sorted(set(kwargs) - set(signature.parameters))
            if unknown:
                known = ", ".join(p for p in signature.parameters if p != "self")
                raise ParameterError(unknown[0], kwargs[unknown[0]],
                                     f"no such parameter of {type(self).__name__}; known: {known}") from None
            raise
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        model = signature_model(checked)
        try:
            valid = model.model_validate(arguments)
        except ValidationError as exc:
            raise first_error(exc) from None
        init(self, **{name: getattr(valid, name) for name in arguments})

    return checked
