"""How a config field is typed, read from text and checked: each dataclass of `config`
validates itself with `check_fields`, and `flags` makes a command-line flag of each field from
`field_specs`."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from .errors import require as _require


def check_fields(obj: Any) -> None:
    """Validate every `Literal[...]` field of a dataclass against its allowed values, and
    refuse non-finite numbers in any field, wherever they came from (a flag, a TOML file, a
    config.json): `--lr inf` would otherwise train on NaN to the end."""
    for name, spec in field_specs(type(obj)).items():
        _check_type(obj, name, spec, getattr(obj, name))
        value = getattr(obj, name)  # 1 made 1.0 where a float is due
        _require(not spec.choices or value in spec.choices,
                 f"{name} must be one of {', '.join(map(str, spec.choices))}, not {value!r}")
        numbers = value if isinstance(value, tuple) else (value,)
        _require(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
                 f"{name} must be a finite number, not {value!r}")


class Options(tuple):
    """A user's network's keyword arguments (its entry's `[name.model.options]` table):
    read-only and hashable, so that a ModelConfig stays a frozen value; config.json and
    `as_dict` give the table back."""

    def __new__(cls, items: Any = ()) -> Options:
        pairs = items.items() if isinstance(items, dict) else items
        return super().__new__(cls, sorted((str(k), _frozen(v)) for k, v in pairs))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self}


def _frozen(value: Any) -> Any:
    _require(isinstance(value, str | int | float | bool | list | tuple),
             f"options take numbers, strings, true or false and lists of them, not {value!r}")
    return tuple(value) if isinstance(value, list | tuple) else value


TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}


def _check_type(obj: Any, name: str, spec: FieldSpec, value: Any) -> None:
    """Refuse a value of the wrong type (`lr = "fast"` in a TOML file, a string in a config.json)
    with its name, before any check compares it; a whole number where a float is due is made
    that float, so that 1 and 1.0 label a run alike."""
    def fits(v: Any) -> bool:
        if isinstance(v, bool) or spec.kind is bool:
            return isinstance(v, bool) and spec.kind is bool
        return isinstance(v, spec.kind) or (spec.kind is float and isinstance(v, int))

    if spec.kind is Options:
        _require(isinstance(value, dict | tuple | list),
                 f"{name} must be a table of keyword arguments, not {value!r}")
        object.__setattr__(obj, name, Options(value))
        return
    kind = TYPE_WORDS[spec.kind]
    if spec.sequence:
        _require(isinstance(value, tuple | list) and all(fits(v) for v in value),
                 f"{name} must be a list of {kind.split(' ', 1)[1]}s, not {value!r}")
        return
    _require(fits(value) or (value is None and spec.optional),
             f"{name} must be {kind}{' or none' if spec.optional else ''}, not {value!r}")
    if spec.kind is float and isinstance(value, int):
        object.__setattr__(obj, name, float(value))


@dataclass(frozen=True)
class FieldSpec:
    """How to read a config field from text: its plain type, allowed values, whether None is ok."""

    kind: type
    choices: tuple = ()
    optional: bool = False
    sequence: bool = False  # a tuple of `kind`, written 60,120,160 on a command line


def field_specs(cls: type) -> dict[str, FieldSpec]:
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Literal:
            out[name] = FieldSpec(type(args[0]), args)
        elif origin in (typing.Union, types.UnionType):
            out[name] = FieldSpec(next(a for a in args if a is not type(None)), optional=True)
        elif origin is tuple:
            out[name] = FieldSpec(args[0], sequence=True)
        else:
            out[name] = FieldSpec(hint)
    return out
