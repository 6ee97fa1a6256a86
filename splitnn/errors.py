"""Errors and parameter checks shared by every package, so bad input fails early and says why."""
from __future__ import annotations

import reprlib
from typing import Any, Iterable, Literal, overload

#: The longest a value is ever shown in a message: a huge or deeply nested value never floods the terminal
#: (and is never expanded in full: reprlib stops at these sizes).
VALUE_CHARS = 120
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 3, 4, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short_repr(value: Any, limit: int = VALUE_CHARS) -> str:
    """``repr(value)``, shortened to at most ``limit`` characters without building the full repr."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def problem(key: str, value: Any, expected: str) -> str:
    """The one wording of a bad value: ``key: got VALUE, expected WHAT`` (the value shortened)."""
    return f"{key}: got {short_repr(value)}, expected {expected}"


class ParameterError(ValueError):
    """A parameter (or config key) has a bad value; names the key, the value (shortened) and what was expected."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(problem(key, value, expected))

    def under(self, prefix: str) -> "ParameterError":
        """The same error with its key placed under a config path, e.g. ``defenses[1].params``."""
        return ParameterError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.expected)


@overload
def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: Literal[True]) -> int: ...
@overload
def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int: ...
def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """Return ``value`` if it is a number inside the given bounds, else raise ParameterError."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ParameterError(key, value, kind)
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "")
    if value != value:  # NaN
        raise ParameterError(key, value, expected)
    if low is not None and (value < low or (low_open and value == low)):
        raise ParameterError(key, value, expected)
    if high is not None and (value > high or (high_open and value == high)):
        raise ParameterError(key, value, expected)
    return value


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ParameterError(key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(key, value, "true or false")
    return value
