"""The command line's grammar: each command's arguments, every config field as a flag
(generated from the dataclasses, so the flags never drift from the configs), and the flag that
names the user's experiment files. What the commands do is `cli`'s."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .config import BASE_EXPERIMENT, SECTIONS
from .fields import Options, field_specs

EXIT_USAGE = 2  # a bad argument, as argparse exits


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


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument costs one line on stderr, not the whole usage text."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The package's version, and the commit where it runs from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    from .training.run_folder import GIT_COMMIT

    try:
        number = version("resnet-study")
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH
        number = "(not installed)"
    return f"resnet-study {number}" + (f" (commit {GIT_COMMIT})" if GIT_COMMIT != "unknown"
                                        else "")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="resnet-study",
        description="Reproduce and extend the improved ResNet-18 CIFAR-100 study.",
        epilog="Each command's options: resnet-study COMMAND --help. The documentation: "
               "README.md and docs/ at the top of the project's source tree.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    _add_experiments(sub)
    _add_train(sub)
    _add_study(sub)
    _add_report(sub)
    _add_search(sub)
    _add_bench(sub)
    _add_inspect(sub)
    _add_evaluate(sub)
    return parser


def _add_experiments(sub) -> None:
    p = sub.add_parser("experiments", help="list the paper's experiments (and your own)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    add_experiment_files(p)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one experiment",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", help="experiment name (see `resnet-study experiments`)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<experiment>/seed-<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars; one line per epoch")
    add_experiment_files(p)
    add_config_flags(p)


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run experiments x seeds into one directory (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiments", nargs="*", help="experiment names (or --all)")
    p.add_argument("--all", action="store_true", help="the paper's twelve experiments")
    p.add_argument("--group", action="append", default=[],
                   help="add a group of experiments (literature: WRN-16-8 and ResNet-110, "
                        "each with its published recipe and with the paper's; improved: this "
                        "study's improved ResNet-18s; improved-ablation: the base-cost one with "
                        "one part put back at a time; improved-v1: issue 20's two; "
                        "own: the entries of --experiments "
                        "files that name no group)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per experiment")
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    p.add_argument("--quick", action="store_true",
                   help="a short try (few epochs on a subset), marked quick in every output")
    p.add_argument("--shard", default="1/1", help="run the i-th of n disjoint parts: i/n")
    p.add_argument("--devices", help="run one run per listed device in parallel: 0,1 or cpu,cpu")
    p.add_argument("--runs-per-device", default="auto",
                   help="runs at once on each device (--devices, else --device), as processes; "
                        "auto: 1 on a CPU, as many as fit on a GPU (up to 4)")
    add_experiment_files(p)
    add_config_flags(p)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="Table 1, figures and statistics of a study")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--no-inspect", dest="inspect", action="store_false",
                   help="leave out the section on the inside of the models (each completed run "
                        "with a checkpoint is otherwise inspected, once)")
    p.add_argument("--base", default=BASE_EXPERIMENT,
                   help="the experiment the statistics compare every other one with")


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="search the ablation space with Optuna, choosing on a "
                       "validation split (never the test set)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", nargs="?", default=BASE_EXPERIMENT,
                   help="the experiment searched around: what no knob or flag sets")
    p.add_argument("--out", type=Path, default=Path("runs/search"),
                   help="the search folder: trials, journal, trials.csv, figures, best.toml")
    p.add_argument("--space", type=Path, help="a search space file (default: the shipped one, "
                   "the paper's knobs; docs/search.md)")
    p.add_argument("--trials", type=int, default=20,
                   help="trials in all (pruned ones count, draws over --max-gflop-per-image "
                        "do not; a rerun goes on to this number)")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="postgresql://user:password@host:port/database to share "
                   "the search between machines (default: a journal file in --out)")
    p.add_argument("--study-name", help="the Optuna study's name (default: --out's name); the "
                   "same on every machine of one search")
    p.add_argument("--pruner", choices=["halving", "median", "none"], default="halving",
                   help="judges each trial at the end of a complete schedule: halving keeps the "
                        "best third for a 3x longer one (min-epochs x 3^k, then --epochs); "
                        "none trains every trial's --epochs")
    p.add_argument("--min-epochs", type=int,
                   help="the first, shortest complete schedule (default: 3, or --epochs if "
                        "fewer)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    p.add_argument("--max-gflop-per-image", type=float,
                   help="never train a configuration costing more training GFLOP per image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_experiment_files(p)
    add_config_flags(p)  # a flag fixes its knob; --val-split defaults to 5000 here


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="images/s of the training loop against the bare step "
                       "and the usual torchvision pipeline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", nargs="?", default="resnet18-lr0.01")
    p.add_argument("--batches", type=int, default=10, help="batches per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each window")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the torchvision Dataset/DataLoader/resnet18 pipeline")
    p.add_argument("--json", action="store_true")
    add_experiment_files(p)
    add_config_flags(p)  # --data defaults to synthetic here: speed does not depend on pixels


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="feature maps, filters, Grad-CAM, activation statistics "
                       "and a t-SNE map of a trained run, into RUN_DIR/inspect/",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", type=int, default=2000,
                   help="test images for the statistics, the t-SNE map and the Grad-CAM choice")
    p.add_argument("--data", help="data to inspect on (default: the run's)")
    p.add_argument("--device", help="device (default: the run's)")
    p.add_argument("--json", action="store_true")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="re-evaluate a run's checkpoint on the test set")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", help="data to evaluate on (default: the run's)")
    p.add_argument("--device", help="device (default: the run's)")
    p.add_argument("--json", action="store_true")
