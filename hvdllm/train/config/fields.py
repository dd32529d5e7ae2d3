"""Config fields that carry their own rules: a :class:`Knob` (help, allowed choices, numeric bounds) in
each dataclass field's metadata, and one generic coercion + check that walks them.

A value is a bool, int, float or str (or None where the annotation is ``X | None``; None then means
the help's "none" meaning). Every float must be finite. Errors are one line naming the key, the bad
value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """Bad user input (config, flags, data path, checkpoint mismatch): the CLI exits with status 2."""


@dataclasses.dataclass(frozen=True)
class Knob:
    """What one config field means and which values it accepts (bounds are inclusive unless *_open)."""

    help: str
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none: str = ""                       # what None means, for optional fields

    def range_text(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return ""

    def in_range(self, v: float) -> bool:
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok


def knob(default: Any, help: str, *, choices: tuple[str, ...] = (), ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None, none: str = "") -> Any:
    """A dataclass field whose metadata holds its :class:`Knob` (``ge``/``gt``/``le``/``lt``: bounds)."""
    spec = Knob(help, tuple(choices), ge if gt is None else gt, le if lt is None else lt, gt is not None,
                lt is not None, none)
    return dataclasses.field(default=default, metadata={"knob": spec})


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One ``section.name`` key: its base type, whether None is allowed, its default and its knob."""

    key: str
    base: type
    optional: bool
    default: Any
    knob: Knob

    def allowed(self) -> str:
        """What values are allowed, in words (the text of help and of every error)."""
        k = self.knob
        if k.choices:
            text = ", ".join(k.choices)
        elif self.base is bool:
            text = "true, false"
        else:
            text = "a finite float" if self.base is float else _a(self.base)
            text += f" {k.range_text()}" if k.range_text() else ""
        return text + (f", or none ({k.none})" if self.optional else "")

    def coerce(self, value: Any) -> Any:
        """``value`` (TOML/YAML value, or a --set/flag string) as this field's type, checked; else ConfigError."""
        v = _as_type(self, value)
        if v is None:
            return None
        if self.knob.choices and v not in self.knob.choices:
            raise self.error(v, "is not allowed")
        if self.base is float and not math.isfinite(v):
            raise self.error(v, "is not finite")
        if self.base in (int, float) and not self.knob.in_range(v):
            raise self.error(v, "is out of range")
        return v

    def error(self, value: Any, problem: str) -> ConfigError:
        shown = value.strip() if isinstance(value, str) and self.base is not str else value
        return ConfigError(f"{self.key}={shown!r} {problem}; allowed: {self.allowed()}")


def _a(base: type) -> str:
    return f"{'an' if base is int else 'a'} {base.__name__}"


_TRUE, _FALSE, _NONE = ("true", "1", "yes", "on"), ("false", "0", "no", "off"), ("none", "null", "")


def _as_type(spec: FieldSpec, value: Any) -> Any:
    base = spec.base
    if isinstance(value, str) and base is not str:
        s = value.strip().lower()
        if spec.optional and s in _NONE:
            return None
        if base is bool and s in _TRUE + _FALSE:
            return s in _TRUE
        if base in (int, float):
            try:
                return base(s)
            except ValueError:
                pass
        raise spec.error(value, f"is not {_a(base)}")
    if value is None:
        if spec.optional:
            return None
        raise spec.error(value, "is not allowed")
    if isinstance(value, bool) != (base is bool):
        raise spec.error(value, f"is not {_a(base)}")
    if isinstance(value, base) or (base is float and isinstance(value, int)):
        try:
            return base(value)
        except OverflowError:                # an int beyond any float
            raise spec.error(value, "is not finite") from None
    raise spec.error(value, f"is not {_a(base)}")


def field_specs(section: type, name: str) -> dict[str, FieldSpec]:
    """The :class:`FieldSpec` of every field of a section dataclass, by field name."""
    hints = typing.get_type_hints(section)
    out = {}
    for f in dataclasses.fields(section):
        args = typing.get_args(hints[f.name])
        base = next((a for a in args if a is not type(None)), None) if args else hints[f.name]
        out[f.name] = FieldSpec(f"{name}.{f.name}", base, type(None) in args, f.default, f.metadata["knob"])
    return out
