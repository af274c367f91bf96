"""A study directory read back: its completed runs, and every other run with the reason it has
no result.

Run folders travel: they are copied, synced and edited by hand, so any of their files may be
missing, truncated or another run's. Each file is checked here as strictly as user data, and a
run that fails a check is reported as unreadable, with the reason, instead of stopping the
report.
"""

from __future__ import annotations

import csv
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import EXPERIMENTS, Experiment, UsageError

CURVES = ("train_loss", "test_loss", "test_top1")  # the metrics.csv columns the figures draw


@dataclass
class Run:
    experiment: Experiment
    summary: dict
    metrics: dict[str, np.ndarray]  # column -> per-epoch values
    predictions: dict[str, np.ndarray] | None  # predicted and true class per test image
    directory: Path



class Unreadable(Exception):
    """A run file that is missing, truncated or not what the run wrote."""


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
    order = list(EXPERIMENTS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _read_run(run_dir: Path) -> Run | dict:
    """The run, or {status, reason} for a run that finished without a result or is unfinished."""
    if not (run_dir / "summary.json").exists():
        return {"status": "interrupted",
                "reason": "no result yet; rerun the study command to resume it"}
    summary = _read_json(run_dir / "summary.json")
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
    try:
        experiment = Experiment.from_dict(_read_json(run_dir / "config.json"))
    except (UsageError, KeyError, TypeError, ValueError) as e:
        raise Unreadable(f"config.json is not a resnet-study config ({e})") from None
    metrics = _read_metrics(run_dir / "metrics.csv")
    if len(metrics["epoch"]) != summary["epochs"]:
        raise Unreadable(f"metrics.csv holds {len(metrics['epoch'])} epochs, summary.json says "
                         f"{summary['epochs']}")
    return Run(experiment, summary, metrics, _read_predictions(run_dir / "predictions.npz"),
               run_dir)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise Unreadable(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Unreadable(f"{path.name} cannot be read ({e})") from None
    except ValueError as e:
        raise Unreadable(f"{path.name} is not valid JSON ({e}); truncated?") from None
    if not isinstance(obj, dict):
        raise Unreadable(f"{path.name} is not a JSON object")
    return obj


def _read_metrics(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise Unreadable("metrics.csv is missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise Unreadable(f"metrics.csv cannot be read ({e})") from None
    if not rows:
        raise Unreadable("metrics.csv holds no epochs (only a header, or nothing)")
    missing = [c for c in ("epoch", *CURVES) if c not in rows[0]]
    if missing:
        raise Unreadable(f"metrics.csv has no {', '.join(missing)} column")
    try:  # the columns the report draws; others may be empty (test_top1_tta before the last)
        return {k: np.array([float(r[k]) for r in rows]) for k in ("epoch", *CURVES)}
    except (TypeError, ValueError):
        raise Unreadable("metrics.csv has a row with missing or non-numeric values; "
                         "truncated?") from None


def _read_predictions(path: Path) -> dict[str, np.ndarray] | None:
    """A run's test predictions; None for a run that has none (older runs)."""
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
