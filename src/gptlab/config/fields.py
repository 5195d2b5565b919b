"""What a config field declares (`setting()`: its help, choices or range, which validation and
`--help` read) and how a command-line string or TOML/JSON value becomes the field's type."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class Range:
    """The numbers from `low` to `high` (None: unbounded), each included unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        """'greater than 0', '1 or more', 'in [0, 1)', ..."""
        lo, hi = _number_text(self.low), _number_text(self.high)
        if self.high is None:
            return f"greater than {lo}" if self.low_open else f"{lo} or more"
        if self.low is None:
            return f"less than {hi}" if self.high_open else f"{hi} or less"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"


def _number_text(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)


def setting(
    default: Any, help: str, choices: tuple[str, ...] | None = None, bounds: Range | None = None
) -> Any:
    """A dataclass field with its one line of help and, where given, the choices of an enum-like
    string or the range of a number."""
    metadata: dict[str, Any] = {"help": help, "choices": choices, "range": bounds}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def field_help(f: dataclasses.Field) -> str:
    """The one line of meaning a config field declares."""
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The values an enum-like config field accepts, or None for an open field."""
    return f.metadata.get("choices")


def field_range(f: dataclasses.Field) -> Range | None:
    """The range a numeric config field accepts, or None when any number will do."""
    return f.metadata.get("range")


def coerce(name: str, value: Any, current: Any) -> Any:
    """value (a command-line string or a TOML/JSON value) as the type of `current`."""
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        return _parse(name, value, kind)
    if kind is bool and not isinstance(value, bool):
        raise GptlabError(f"{name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float):  # 1e3 or 2.5 in TOML: say so, do not round
        raise GptlabError(f"{name} must be an integer, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GptlabError(f"{name} must be of type {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise GptlabError(f"{name} must be a finite number, got {value!r}")
    return value


def _parse(name: str, text: str, kind: type) -> Any:
    t = text.strip().lower()
    if kind is bool:
        if t in ("true", "1", "yes", "on"):
            return True
        if t in ("false", "0", "no", "off"):
            return False
        raise GptlabError(f"{name} must be true or false, got {text!r}")
    try:
        number = float(t)
    except ValueError:
        what = "an integer" if kind is int else "a"
        raise GptlabError(f"{name} must be {what} number, got {text!r}") from None
    if not math.isfinite(number):
        raise GptlabError(f"{name} must be a finite number, got {text!r}")
    if kind is float:
        return number
    try:
        return int(t)  # not int(number): a float cannot hold every large integer exactly
    except ValueError:
        raise GptlabError(f"{name} must be an integer, got {text!r}") from None


def check_fields(obj: Any, section: str) -> None:
    """Every field of obj within the range, and among the choices, its metadata declares."""
    for f in fields(obj):
        v, bounds, choices = getattr(obj, f.name), field_range(f), field_choices(f)
        if bounds is not None and v not in bounds:
            raise GptlabError(f"{section}.{f.name} must be {bounds.describe()}, got {v}")
        if choices is not None and v not in choices:
            raise GptlabError(f"{section}.{f.name} must be one of {', '.join(choices)}; got {v!r}")
