"""The user's own experiments: TOML files in the presets' own format (`--experiments FILE`).

Each entry builds on a named experiment (`extends`, a preset or another entry of the files) and
overrides its settings, validated exactly as the presets are:

    ["resnet18-lr0.05"]
    extends = "resnet18-lr0.01"
    row = "ResNet-18 LR = 0.05"
    notes = "Between the paper's 0.1 and 0.01."
    ["resnet18-lr0.05".train]
    lr = 0.05

This module reads and checks the files; `catalogue` resolves their entries, as it does the
presets. A run records its whole recipe in its config.json, so a study folder is reported
without the file. Any fault in a file is one line naming the file, the entry and the key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .config import EXECUTION_FIELDS, RECIPE_SECTIONS, SECTION_OF
from .errors import UsageError
from .files import read_user_text

ENTRY_KEYS = ("extends", "row", "notes", "group")
# A name is a folder of every study (<out>/<name>/seed-<n>): no path, no surprises in a shell.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
OWN_GROUP = "own"  # the group of an entry that names none


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path
    name: str
    spec: dict[str, Any]

    @property
    def where(self) -> str:
        """How every message names the entry: FILE: [name]."""
        return f"{self.path}: [{self.name}]"


def read(paths: list[Path], builtin: Collection[str]) -> dict[str, Entry]:
    """Every entry of the files by name, each checked on its own (name, keys, types of the
    entry's own keys); what needs the other entries (parents, values) is checked when the
    catalogue resolves them. `builtin`: the presets' names, which no entry may take."""
    entries: dict[str, Entry] = {}
    for path in paths:
        for name, spec in _load(path).items():
            where = f"{path}: [{name}]"
            _require(NAME.fullmatch(name) is not None, f"{where}: an experiment's name is a "
                     "folder name: a letter or digit, then letters, digits and . _ + -, at most "
                     "100 characters")
            _require(name not in builtin, f"{where}: {name!r} is a built-in experiment; "
                     "choose another name (extends = \"" + name + "\" builds on it)")
            _require(name not in entries, f"{where}: {name!r} is defined twice (first in "
                     f"{entries[name].path if name in entries else ''})")
            _require(isinstance(spec, dict), f"{where}: an entry is a table of settings, "
                     f"not {spec!r}")
            _check_keys(where, name, spec)
            entries[name] = Entry(path, name, spec)
    return entries


def _load(path: Path) -> dict[str, Any]:
    text = read_user_text(path, "experiments file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None


def _check_keys(where: str, name: str, spec: dict[str, Any]) -> None:
    for key, value in spec.items():
        if key in RECIPE_SECTIONS:
            _require(isinstance(value, dict), f"{where}: {key} is a table of settings "
                     f"([{name}.{key}]), not {value!r}")
            for setting in value:
                _require(SECTION_OF.get(setting) == key and setting not in EXECUTION_FIELDS,
                         f"{where}: {key}.{setting}: " + _unknown(name, setting))
        elif key in ENTRY_KEYS:
            _require(isinstance(value, str), f"{where}: {key} must be a string, not {value!r}")
        else:
            _require(False, f"{where}: {key}: " + _unknown(name, key))
    _require(spec.get("group") != "paper", f"{where}: group: the group paper is the paper's "
             "twelve experiments; choose another group name")


def _unknown(name: str, key: str) -> str:
    section = SECTION_OF.get(key)
    if key in EXECUTION_FIELDS:
        return ("not part of an experiment: execution settings (device, precision, data, "
                "seed, ...) are flags of the command")
    if section is not None:
        return f"unknown key here: {key} belongs in [{name}.{section}]"
    return (f"unknown key; an entry takes {', '.join(ENTRY_KEYS)} and the tables "
            f"{', '.join(RECIPE_SECTIONS)}, each holding that section's settings "
            "(see `resnet-study train --help`)")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)
