"""A study directory read back: its completed runs, and every other run with the reason it has
no result.

Run folders travel: they are copied, synced and edited by hand, so any of their files may be
missing, truncated or another run's. `RunFolder` reads each as strictly as user data, and a
run that fails a check is reported as unreadable, with the reason, instead of stopping the
report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..catalogue import PRESETS
from ..config import Experiment
from ..errors import UsageError
from ..training.run_folder import RunFolder, Unreadable

CURVES = ("train_loss", "test_loss", "test_top1")  # the metrics.csv columns the figures draw


@dataclass
class Run:
    experiment: Experiment
    summary: dict
    metrics: dict[str, np.ndarray]  # column -> per-epoch values
    predictions: dict[str, np.ndarray] | None  # predicted and true class per test image
    directory: Path


def scan(root: Path) -> tuple[dict[str, list[Run]], list[dict]]:
    """Completed runs by experiment (the paper's order), and the runs without a result:
    failed, diverged, interrupted or unreadable, each as {experiment, run, status, reason}."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a study directory")
    run_dirs = sorted(p for p in root.glob("*/seed-*") if p.is_dir())
    if not run_dirs:
        raise UsageError(f"{root} holds no runs (no <experiment>/seed-<n> folders); give the "
                         "--out folder of a `resnet-study study`")
    found: dict[str, list[Run]] = {}
    without: list[dict] = []
    for run_dir in run_dirs:
        entry = {"experiment": run_dir.parent.name,
                 "run": f"{run_dir.parent.name}/{run_dir.name}"}
        try:
            run = _read_run(run_dir)
        except Unreadable as e:
            without.append({**entry, "status": "unreadable", "reason": str(e)})
            continue
        if isinstance(run, Run):
            found.setdefault(run.experiment.name, []).append(run)
        else:
            without.append({**entry, **run})
    return {name: found[name] for name in paper_order(found)}, without


def paper_order(names) -> list[str]:
    order = list(PRESETS.experiments)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _read_run(run_dir: Path) -> Run | dict:
    """The run, or {status, reason} for a run that finished without a result or is unfinished."""
    folder = RunFolder(run_dir)
    if not folder.has_summary():
        return {"status": "interrupted",
                "reason": "no result yet; rerun the study command to resume it"}
    summary = folder.read_json("summary.json")
    status = summary.get("status")
    if status == "failed":
        return {"status": status, "reason": str(summary.get("error", "no reason recorded"))}
    if status == "diverged":
        return {"status": status,
                "reason": f"non-finite loss in epoch {summary.get('diverged_epoch')}"}
    if status == "stopped":
        return {"status": status, "reason": f"stopped after epoch {summary.get('epochs')}: "
                                            f"{summary.get('stop_reason', 'no reason recorded')}"}
    if status != "completed":
        raise Unreadable(f"summary.json: unknown status {status!r}")
    for key in ("test_top1", "train_seconds", "params", "epochs"):
        value = summary.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise Unreadable(f"summary.json: {key} is {value!r}, not a number")
    experiment = folder.read_experiment()
    metrics = folder.read_metrics(CURVES)
    if len(metrics["epoch"]) != summary["epochs"]:
        raise Unreadable(f"metrics.csv holds {len(metrics['epoch'])} epochs, summary.json says "
                         f"{summary['epochs']}")
    return Run(experiment, summary, metrics, folder.read_predictions(), run_dir)
