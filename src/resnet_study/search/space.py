"""A search space as data: knobs read from TOML (`space.toml` beside this file is the default),
each drawn through Optuna's own `suggest_*`, and the paper's rows mapped onto it.

A knob is a config field, or a switch (a choice that is no field) whose only effect is to turn
other knobs on: `clipping` turns on `grad_clip` and `clip_mode`. A knob that is not drawn keeps
the searched experiment's value, so a trial is always a complete, valid experiment.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import optuna

from ..config import (
    EXECUTION_FIELDS,
    RECIPE_SECTIONS,
    SECTION_OF,
    SECTIONS,
    Experiment,
    differences,
)
from ..errors import UsageError
from ..files import read_user_text

# What sets a search's fidelity (its flags), never a knob.
FIDELITY = {"epochs", "subset", "val_split", "test_subset"}
# What changes neither a trial's training nor its validation figure (test-time flips): two
# experiments that differ only there are the same trial.
UNJUDGED = {"tta"}
KNOB_KEYS = {"choices", "low", "high", "log", "step", "when"}


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()  # (knob, values it must have), all of them

    @property
    def switch(self) -> bool:
        return self.name not in SECTION_OF

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when)

    def undrawn(self, values: dict[str, Any], base: Experiment) -> Any:
        """This setting's value in a trial that does not draw it: its default where a switch it
        needs is off (`clipping = false` clips nothing, whatever `base` clipped at), else
        `base`'s. The one rule both ways: a trial from its knobs, and knobs from a row."""
        switched_off = any(k not in SECTION_OF and values.get(k) not in allowed
                           for k, allowed in self.when)
        return default_of(self.name) if switched_off else _value(base, self.name)

    def draw(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def admits(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices and type(value) in {type(c) for c in self.choices}
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and self.low - 1e-12 <= value <= self.high + 1e-12)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False, ())}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when}
        return d


@dataclasses.dataclass(frozen=True)
class Space:
    source: str  # the file it was read from, as every message names it
    knobs: tuple[Knob, ...]
    left_out: tuple[str, ...] = ()  # the model knobs a network of the user's own cannot take

    def draw(self, trial: optuna.Trial, fixed: dict[str, Any]) -> dict[str, Any]:
        """A trial's knobs (switches included): each active one drawn, in the file's order."""
        values: dict[str, Any] = dict(fixed)
        drawn = {}
        for knob in self.knobs:
            if knob.active(values):
                values[knob.name] = drawn[knob.name] = knob.draw(trial)
        return drawn

    def experiment(self, base: Experiment, drawn: dict[str, Any]) -> Experiment:
        """`base` with a trial's knobs (its switches left out). A knob that a switch turns off
        takes its default; one not drawn because a setting's `when` does not hold keeps
        `base`'s value, or its default where that value needs what the `when` names: around a
        Nesterov SGD experiment a drawn Adam turns Nesterov off."""
        values = {k: v for k, v in drawn.items() if k in SECTION_OF} | {
            k.name: k.undrawn(drawn, base) for k in self.knobs
            if not k.switch and k.name not in drawn}
        try:
            return base.replace(**values)
        except UsageError:
            seen = {name: _value(base, name) for name in SECTION_OF
                    if SECTION_OF[name] in RECIPE_SECTIONS} | drawn
            off = {k.name: default_of(k.name) for k in self.knobs
                   if k.when and not k.switch and not k.active(seen)}
            return base.replace(**{**values, **off})  # off: only knobs not drawn

    def to_dict(self) -> dict[str, Any]:
        return {k.name: k.to_dict() for k in self.knobs}

    def without(self, fixed: dict[str, Any]) -> Space:
        """The space with the knobs that flags fix taken out."""
        return dataclasses.replace(self, knobs=tuple(k for k in self.knobs if k.name not in fixed))

    def params_of(self, exp: Experiment, base: Experiment, fixed: dict[str, Any]
                  ) -> dict[str, Any] | None:
        """The knob values under which a trial is `exp` (a paper row), or None if the space
        cannot express it: it differs from `base` in a setting that is no knob (pretrained
        weights, say), or a value lies outside its knob's range."""
        knobs = {k.name for k in self.knobs}
        for name, _, _ in _recipe_differences(base, exp):
            if name not in knobs and name not in FIDELITY | UNJUDGED:
                return None
        switches = [k for k in self.knobs if k.switch]
        for combination in itertools.product(*(k.choices for k in switches)):
            params = self._walk(exp, base, fixed, dict(zip((k.name for k in switches),
                                                           combination, strict=True)))
            if params is not None:
                return params
        return None

    def _walk(self, exp: Experiment, base: Experiment, fixed: dict[str, Any],
              switches: dict[str, Any]) -> dict[str, Any] | None:
        values, params = dict(fixed), {}
        for knob in self.knobs:
            if not knob.active(values):
                if not knob.switch and _value(exp, knob.name) != knob.undrawn(values, base):
                    return None  # exp sets a knob that this combination leaves off
                continue
            value = switches[knob.name] if knob.switch else _value(exp, knob.name)
            if not knob.admits(value):
                return None
            values[knob.name] = params[knob.name] = value
        return params


def _value(exp: Experiment, name: str) -> Any:
    return getattr(getattr(exp, SECTION_OF[name]), name)


def default_of(name: str) -> Any:
    """A setting's default: the value a knob takes when off (`Space.experiment`)."""
    return getattr(SECTIONS[SECTION_OF[name]](), name)


def _recipe_differences(a: Experiment, b: Experiment) -> Iterator[tuple[str, Any, Any]]:
    yield from differences(a, b, RECIPE_SECTIONS, ignore=lambda f: f.name in EXECUTION_FIELDS)


def load_space(path: Path | None, base: Experiment) -> Space:
    """The space in `path` (the shipped default if None), every knob checked against `base`:
    a value a knob can take must make a valid experiment of it."""
    if path is None:
        source, text = "the default space", resources.files(__package__).joinpath(
            "space.toml").read_text()
    else:
        source = str(path)
        text = read_user_text(path, "search space file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{source}: not valid TOML ({e})") from None
    knobs: list[Knob] = []
    for name, spec in raw.items():
        knobs.append(_knob(f"{source}: [{name}]", name, spec, knobs))
    referenced = {k for knob in knobs for k, _ in knob.when}
    for knob in knobs:
        _require(not knob.switch or knob.name in referenced,
                 f"{source}: [{knob.name}]: unknown setting; a knob is a config field (see "
                 "`resnet-study train --help`), or a switch that another knob's `when` names")
    left_out: tuple[str, ...] = ()
    if base.model.user_network:  # its settings are its options, which no knob draws
        left_out = tuple(k.name for k in knobs if SECTION_OF.get(k.name) == "model")
        knobs = [k for k in knobs if k.name not in left_out]
    _require(bool(knobs), f"{source}: the space has no knobs"
             + (f" that a network of your own can take (left out: {', '.join(left_out)})"
                if left_out else ""))
    space = Space(source, tuple(knobs), left_out)
    for knob in knobs:
        _check_values(space, knob, base)
    return space


def _knob(where: str, name: str, spec: Any, earlier: list[Knob]) -> Knob:
    _require(isinstance(spec, dict), f"{where}: a knob is a table (choices, or low and high)")
    unknown = sorted(set(spec) - KNOB_KEYS)
    _require(not unknown, f"{where}: unknown key {', '.join(unknown)}; a knob takes "
                          f"{', '.join(sorted(KNOB_KEYS))}")
    _require(name not in FIDELITY and name not in EXECUTION_FIELDS
             and SECTION_OF.get(name, "model") in RECIPE_SECTIONS,
             f"{where}: {name} is not searched: it is set by the search's own flags")
    when = spec.get("when", {})
    _require(isinstance(when, dict), f"{where}: when is a table, e.g. when = {{optimizer = "
                                     "\"sgd\"}")
    conditions = []
    for k, v in when.items():
        parent = next((e for e in earlier if e.name == k), None)
        _require(parent is not None and parent.choices is not None, f"{where}: when: {k} is "
                 "not a knob with choices above this one")
        allowed = tuple(v) if isinstance(v, list) else (v,)
        _require(all(a in parent.choices for a in allowed),
                 f"{where}: when: {k} never takes {v!r} (its choices: {list(parent.choices)})")
        conditions.append((k, allowed))
    if "choices" in spec:
        choices = spec["choices"]
        _require(isinstance(choices, list) and bool(choices),
                 f"{where}: choices is a non-empty list")
        extra = sorted({"low", "high", "log", "step"} & set(spec))
        _require(not extra, f"{where}: {', '.join(extra)} go with low and high, not with "
                            "choices")
        knob = Knob(name, choices=tuple(choices), when=tuple(conditions))
    else:
        low, high = spec.get("low"), spec.get("high")
        _require(all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                     for v in (low, high)) and low < high,
                 f"{where}: give choices, or low < high as numbers")
        _require(not spec.get("log") or low > 0, f"{where}: a log scale needs low > 0")
        _require(not (spec.get("log") and spec.get("step")), f"{where}: log and step exclude "
                                                              "each other (Optuna's rule)")
        knob = Knob(name, low=low, high=high, log=bool(spec.get("log", False)),
                    step=spec.get("step"), when=tuple(conditions))
    return knob


def _check_values(space: Space, knob: Knob, base: Experiment) -> None:
    """Each value `knob` can take must make a trial of `base`, drawn where the knob's `when`
    holds (nesterov under SGD) and with the knobs that it turns off at their defaults."""
    if knob.switch:
        return
    holds = {k: allowed[0] for k, allowed in knob.when}
    for value in knob.choices if knob.choices is not None else (knob.low, knob.high):
        try:
            space.experiment(base, {**holds, knob.name: value})
        except UsageError as e:
            raise UsageError(f"{space.source}: [{knob.name}]: {e}") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)
