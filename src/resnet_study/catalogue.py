"""The experiments a command knows: the presets (`experiments.toml`) and the user's own files
(`--experiments FILE`), resolved by one resolver into one value, passed to what needs it.

An entry builds on another (`extends`) and overrides its settings: a preset on an earlier
preset or on the defaults of `config`'s dataclasses, a user's entry on a preset or on another
entry of the files (the base model if it names none). Each experiment the catalogue hands out
carries the entry it was made from (`Experiment.origin`), so its label is the same in whichever
process computes it; a spawned worker needs nothing else of the catalogue.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from . import experiment_files
from .config import BASE_EXPERIMENT, RECIPE_SECTIONS, SECTIONS, Experiment
from .errors import UsageError
from .experiment_files import OWN_GROUP, Entry
from .models import check_network  # the networks' families register as models is imported

PRESETS_FILE = "experiments.toml"


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """Experiments by name, in the files' order: the presets, then the user's own."""

    experiments: Mapping[str, Experiment]

    def get(self, name: str) -> Experiment:
        if name not in self.experiments:
            raise UsageError(f"unknown experiment {name!r}; choose one of: "
                             f"{', '.join(self.experiments)} (or define it in a file given "
                             "with --experiments)")
        return self.experiments[name]

    def groups(self) -> dict[str, list[str]]:
        """Experiment names by group, in the catalogue's order."""
        out: dict[str, list[str]] = {}
        for name, exp in self.experiments.items():
            out.setdefault(exp.group, []).append(name)
        return out

    def with_files(self, paths: Sequence[Path]) -> Catalogue:
        """This catalogue and the entries of the user's `paths`, checked and resolved."""
        if not paths:
            return self
        entries = experiment_files.read(list(paths), builtin=self.experiments)
        own = resolve(entries, self.experiments, default_parent=BASE_EXPERIMENT,
                      default_group=OWN_GROUP)
        return Catalogue(MappingProxyType({**self.experiments, **own}))


def resolve(entries: Mapping[str, Entry], known: Mapping[str, Experiment], *,
            default_parent: str | None, default_group: str) -> dict[str, Experiment]:
    """Each entry as an experiment built on its parent (`extends`, else `default_parent`; None:
    the dataclasses' defaults), in the entries' order. A cycle, an unknown parent or a bad
    value is one line naming the file, the entry and the key."""
    done: dict[str, Experiment] = {}
    for name in entries:
        _resolve(name, entries, known, done, [], default_parent, default_group)
    return {name: done[name] for name in entries}


def _resolve(name: str, entries: Mapping[str, Entry], known: Mapping[str, Experiment],
             done: dict[str, Experiment], chain: list[str], default_parent: str | None,
             default_group: str) -> Experiment:
    if name in done:
        return done[name]
    if name not in entries:
        return known[name]
    entry = entries[name]
    parent = entry.spec.get("extends", default_parent)
    if parent is None:
        base = Experiment(name=name, row=name)
    else:
        if parent in chain or parent == name:
            raise UsageError(f"{entry.where}: extends: {parent!r} extends it in turn "
                             f"({' -> '.join([*chain, name, parent])}); break the cycle")
        if parent not in known and parent not in entries:
            raise UsageError(f"{entry.where}: extends: unknown experiment {parent!r}; name a "
                             "built-in (`resnet-study experiments`) or an entry of the files")
        base = _resolve(parent, entries, known, done, [*chain, name], default_parent,
                        default_group)
    sections = {}
    for section in RECIPE_SECTIONS:
        values = {**dataclasses.asdict(getattr(base, section)), **entry.spec.get(section, {})}
        try:
            sections[section] = SECTIONS[section](**values)
        except (UsageError, TypeError) as e:
            raise UsageError(f"{entry.where} {section}: {e}") from None
    if sections["model"].user_network and "model" in entry.spec:  # checked where it is named
        try:
            check_network(sections["model"])
        except UsageError as e:
            raise UsageError(f"{entry.where} model: {e}") from None
    exp = Experiment(name=name, row=entry.spec.get("row", name), notes=entry.spec.get("notes", ""),
                     group=entry.spec.get("group", default_group), extends=parent or "",
                     **sections)
    done[name] = dataclasses.replace(exp, origin=exp)
    return done[name]


def _presets() -> Catalogue:
    """The presets, resolved as the user's entries are: an ablation row reads as the one
    setting it takes away from the row it extends."""
    specs = tomllib.loads(resources.files(__package__).joinpath(PRESETS_FILE).read_text())
    entries = {name: Entry(Path(PRESETS_FILE), name, spec) for name, spec in specs.items()}
    return Catalogue(MappingProxyType(resolve(entries, {}, default_parent=None,
                                              default_group="paper")))


PRESETS: Catalogue = _presets()
