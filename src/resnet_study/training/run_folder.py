"""One run's folder, and the one module that reads and writes it.

A run folder holds config.json (the recipe and its label), metrics.csv (a row per epoch),
checkpoint.pt, predictions.npz, summary.json (whatever the outcome) and, for a search's trial,
log.txt. `RunFolder` owns its lock (one writer at a time, across processes and torchrun's
ranks), its state, and every read and write of those files; `RunRecord` is what is known of a
run as it goes, and turns any outcome, a failure too, into its summary.json. Study, search,
train, resume and report all go through here.

Run folders travel: they are copied, synced and edited by hand, so the report's reads
(`read_*`) check each file as strictly as user data, raising `Unreadable` with the reason.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..catalogue import PRESETS
from ..config import Experiment
from ..errors import UsageError
from ..files import FolderHeld, atomic_open, hold, write_csv, write_json
from ..ranks import from_rank0, init_ranks, is_main, leave, world_size
from .device import resolve_device

# absent: nothing there yet; running: another process holds it; partial: a checkpoint to
# resume from; completed, diverged, stopped: final, a rerun would only repeat them; failed: no
# checkpoint to resume from (a failure with a checkpoint is partial: its retry resumes).
FINAL = ("completed", "diverged", "stopped")
_HELD: set[Path] = set()  # the folders this process holds


def git_commit(folder: Path) -> str:
    """The commit checked out where `folder` is, `+dirty` where tracked files differ from it;
    "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=folder).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = sha and git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) or "unknown"


# The commit this code was imported from: a process records the code it runs, not a commit made
# after it started (a study's workers import the code once).
GIT_COMMIT = git_commit(Path(__file__).parent)


class Unreadable(Exception):
    """A run file that is missing, truncated or not what the run wrote."""


@dataclasses.dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    # --- the lock ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """The folder's lock (`files.hold`), for this process: `FolderHeld` if another has it."""
        key = self.path.resolve()
        with hold(self.path):
            _HELD.add(key)
            try:
                yield
            finally:
                _HELD.discard(key)

    @contextlib.contextmanager
    def hold_for_ranks(self, device: str) -> Iterator[None]:
        """The lock for all of torchrun's ranks: rank 0 takes it, and every rank learns at once
        whether it could, so that a refusal is one line from each rank, not a wait in the
        process group until its timeout. The ranks join their group here, and leave it after."""
        if world_size() == 1:
            with self.hold():
                yield
            return
        init_ranks(resolve_device(device))
        try:
            with contextlib.ExitStack() as lock:
                refusal = None
                if is_main():
                    try:
                        lock.enter_context(self.hold())
                    except FolderHeld as e:
                        refusal = str(e)
                refusal = from_rank0(refusal)
                if refusal is not None:
                    raise UsageError(refusal)
                yield
        finally:
            leave()

    def running_elsewhere(self) -> bool:
        """Whether another process holds the folder (trains into it now)."""
        if self.path.resolve() in _HELD or not self.path.is_dir():
            return False
        try:
            with hold(self.path):
                return False
        except FolderHeld:
            return True

    # --- its state, read leniently ---------------------------------------------------------

    def state(self) -> str:
        """absent, running, partial, completed, diverged, stopped or failed (see FINAL)."""
        if not self.path.is_dir():
            return "absent"
        if self.running_elsewhere():
            return "running"
        if self.has_summary():
            state = (self.summary() or {}).get("status", "failed")  # unreadable: failed
            if state in FINAL or not self.checkpoint.exists():
                return state
        return "partial" if self.checkpoint.exists() else "absent"

    def has_summary(self) -> bool:
        return (self.path / "summary.json").is_file()

    def summary(self) -> dict | None:
        """summary.json as written; None where it is missing, unreadable or not an object (a
        run killed after its last checkpoint but before its summary has none)."""
        try:
            summary = json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def experiment(self) -> Experiment:
        """The recipe config.json records, as `read_experiment` reads it, for a command handed
        the folder (UsageError if it is no run folder, or its config is not one)."""
        if not (self.path / "config.json").is_file():
            raise UsageError(f"{self.path} is not a run directory (no config.json)")
        try:
            return self.read_experiment()
        except Unreadable as e:
            raise UsageError(f"{self.path}: {e}") from None

    def history(self) -> list[dict[str, float]]:
        """metrics.csv's rows as numbers; none where it is missing or damaged."""
        try:
            with open(self.path / "metrics.csv", newline="") as f:
                return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
        except (OSError, ValueError, csv.Error):
            return []

    # --- its files, written --------------------------------------------------------------

    @contextlib.contextmanager
    def log_lines(self) -> Iterator[Callable[[str], None]]:
        """A writer of lines to the folder's log.txt (a search's trial keeps its lines there,
        where a study's or a command's go to stderr), appended to by each resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            yield lambda line: print(line, file=f, flush=True)

    def write_config(self, exp: Experiment) -> None:
        write_json(self.path / "config.json", exp.to_dict())

    def write_metrics(self, history: list[dict], columns: list[str]) -> None:
        write_csv(self.path / "metrics.csv", history, columns)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def tracker_runs(self) -> dict[str, str]:
        """Each tracker's id of this run (`tracking.json`), so that a resumed run goes on in the
        tracker's run it started, not in a new one; {} where there is none or it is unreadable."""
        try:
            ids = json.loads((self.path / "tracking.json").read_text())
        except (OSError, ValueError):
            return {}
        return ids if isinstance(ids, dict) else {}

    def write_tracker_run(self, tracker: str, run_id: str) -> None:
        write_json(self.path / "tracking.json", {**self.tracker_runs(), tracker: run_id})

    def write_predictions(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        with atomic_open(self.path / "predictions.npz") as f:
            np.savez(f, predicted=predicted, labels=labels)

    # --- its files, read strictly (the report) ---------------------------------------------

    def read_json(self, name: str) -> dict:
        path = self.path / name
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise Unreadable(f"{name} is missing") from None
        except (OSError, UnicodeDecodeError) as e:
            raise Unreadable(f"{name} cannot be read ({e})") from None
        except ValueError as e:
            raise Unreadable(f"{name} is not valid JSON ({e}); truncated?") from None
        if not isinstance(obj, dict):
            raise Unreadable(f"{name} is not a JSON object")
        return obj

    def read_experiment(self) -> Experiment:
        try:
            return _recorded(self.read_json("config.json"))
        except (UsageError, KeyError, TypeError, ValueError) as e:
            raise Unreadable(f"config.json is not a resnet-study config ({e})") from None

    def read_metrics(self, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The `columns` of metrics.csv (with `epoch`), each a number in every row."""
        try:
            with open(self.path / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            raise Unreadable("metrics.csv is missing") from None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise Unreadable(f"metrics.csv cannot be read ({e})") from None
        if not rows:
            raise Unreadable("metrics.csv holds no epochs (only a header, or nothing)")
        missing = [c for c in ("epoch", *columns) if c not in rows[0]]
        if missing:
            raise Unreadable(f"metrics.csv has no {', '.join(missing)} column")
        try:  # other columns may be empty (test_top1_tta before the last epoch)
            return {k: np.array([float(r[k]) for r in rows]) for k in ("epoch", *columns)}
        except (TypeError, ValueError):
            raise Unreadable("metrics.csv has a row with missing or non-numeric values; "
                             "truncated?") from None

    def read_predictions(self) -> dict[str, np.ndarray] | None:
        """The run's test predictions; None for a run that has none (older runs)."""
        path = self.path / "predictions.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                predictions = {k: z[k] for k in ("predicted", "labels")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise Unreadable(f"predictions.npz is damaged ({type(e).__name__})") from None
        if predictions["predicted"].shape != predictions["labels"].shape:
            raise Unreadable("predictions.npz: predictions and labels differ in length")
        return predictions


def _recorded(config: dict) -> Experiment:
    """The experiment a config.json records, under the label it records; one written before
    runs recorded their labels is labelled by the preset of its name, as it was then."""
    exp = Experiment.from_dict(config)
    preset = PRESETS.experiments.get(exp.name)
    if exp.recorded is None and preset is not None:
        return dataclasses.replace(exp, origin=preset.origin)
    return exp


class RunRecord:
    """What is known of one run so far, and the writer of its summary.json (rank 0 only).

    It learns what a run is as the run is assembled (its parameters, device, precision, data)
    and keeps it, so that a run that fails, diverges or is stopped records everything that was
    known about it beside its status, not only its error. The protocol label (profile, settings,
    overrides) is the one the run was made under."""

    def __init__(self, exp: Experiment, folder: RunFolder) -> None:
        self.folder = folder
        self.summary: dict | None = None  # the last summary written
        self.facts: dict[str, Any] = {
            "experiment": exp.name, "seed": exp.train.seed, "params": None, "epochs": 0,
            "test_top1": None, "test_top5": None, "train_seconds": 0.0,
            "images_per_second": None, "peak_memory_mib": None, "device": None,
            "precision": None, "torch": torch.__version__, "git_commit": GIT_COMMIT,
            "dataset": None, "profile": exp.profile, "settings": exp.settings,
            "overrides": exp.overrides(), "processes": 1, "cuda_graph": False,
            "capture_seconds": 0.0}

    def learn(self, **facts: Any) -> None:
        self.facts.update(facts)

    def learn_history(self, history: list[dict]) -> None:
        """The epochs done: their number, the last one's accuracy, the time and speed."""
        last = history[-1] if history else {}
        self.learn(epochs=len(history), test_top1=last.get("test_top1"),
                   test_top5=last.get("test_top5"), val_top1=last.get("val_top1"),
                   train_seconds=sum(r["epoch_seconds"] for r in history),
                   images_per_second=(sum(r["images_per_second"] for r in history)
                                      / len(history) if history else None),
                   **({"test_top1_tta": last["test_top1_tta"]} if "test_top1_tta" in last
                      else {}))

    def write(self, status: str, **extra: Any) -> dict:
        """summary.json with `status` (completed, diverged, stopped or failed) and all known."""
        facts = dict(self.facts)
        summary = {"experiment": facts.pop("experiment"), "status": status, **facts, **extra}
        if is_main():
            self.folder.write_summary(summary)
        self.summary = summary
        return summary
