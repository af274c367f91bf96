"""A run's summary.json, written by one writer whatever the outcome.

The record learns what a run is as the run is assembled (its parameters, device, precision,
data) and keeps it, so that a run that fails, diverges or is stopped records everything that
was known about it beside its status, not only its error. The protocol label (profile,
settings, overrides) is the one the run was trained under, fixed when it starts.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..config import Experiment
from ..files import write_json


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunRecord:
    """What is known of one run so far, and the writer of its summary.json (rank 0 only)."""

    def __init__(self, exp: Experiment, out: Path) -> None:
        self.out = Path(out)
        self.main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 writes
        self.summary: dict | None = None  # the last summary written
        self.facts: dict[str, Any] = {
            "experiment": exp.name, "seed": exp.train.seed, "params": None, "epochs": 0,
            "test_top1": None, "test_top5": None, "train_seconds": 0.0,
            "images_per_second": None, "peak_memory_mib": None, "device": None,
            "precision": None, "torch": torch.__version__, "git_commit": git_commit(),
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
        if self.main:
            write_json(self.out / "summary.json", summary)
        self.summary = summary
        return summary
