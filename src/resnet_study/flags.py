"""Every config field as a command-line flag, generated from the dataclasses (so the flags never
drift from the configs), and the flag that names the user's experiment files."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .config import SECTIONS
from .fields import Options, field_specs


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _parse_sequence(kind: type):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())
    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per config field; only flags given on the command line reach the run."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(
            "execution settings (how and where a run executes; not the paper's protocol)"
            if section == "execution" else f"{section} settings (override the experiment)")
        specs = field_specs(cls)
        for f in dataclasses.fields(cls):
            spec = specs[f.name]
            if spec.kind is Options:  # a table: a user's network's, in its experiments file
                continue
            flag = "--" + f.name.replace("_", "-")
            kw = dict(dest=f.name, default=argparse.SUPPRESS,
                      help=f"base recipe: {f.default}; an experiment may set another")
            if spec.kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            else:
                parse = (_parse_optional(spec.kind) if spec.optional else
                         _parse_sequence(spec.kind) if spec.sequence else spec.kind)
                group.add_argument(flag, choices=spec.choices or None, type=parse, **kw)


def config_overrides(args: argparse.Namespace) -> dict:
    fields = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in fields}


def add_experiment_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiments", dest="experiment_files", action="append", type=Path,
                        default=[], metavar="FILE.toml",
                        help="your own experiments, each extending a named one (repeatable; "
                             "docs/experiments.md)")
