"""Issue 18's concurrency acceptance, measured: several `study` processes on one folder.

    python benchmarks/run_folders.py WORKDIR

1. Three studies of 4 tiny runs into one folder, started together, then 3 s apart: every run
   trained exactly once (4 start lines in all the logs, and 4 completed runs), no process
   failed, and every run's summary.json, metrics.csv and checkpoint agree.
2. Three times: two studies started together, one SIGKILLed at a random moment; then the
   survivor ends and one more study finishes what is left. Every run's metrics (timings aside)
   equal those of an uninterrupted one-process study (--deterministic, CPU).
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

RUNS = ["resnet18-lr0.01", "resnet18-adam", "--seeds", "2"]
TINY = ["--data", "synthetic", "--subset", "128", "--test-subset", "64", "--batch-size", "32",
        "--epochs", "2", "--device", "cpu", "--deterministic"]
TIMINGS = {"epoch_seconds", "eval_seconds", "images_per_second"}


def study(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resnet_study", "study", *RUNS, *TINY,
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in csv.DictReader(f)]


def consistent(run: Path) -> bool:
    summary = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    epochs = [int(r["epoch"]) for r in metrics(run)]
    return (summary["status"] == "completed" and summary["epochs"] == ckpt["epoch"] == 2
            and epochs == [1, 2] and len(ckpt["history"]) == 2)


def runs_of(root: Path) -> list[Path]:
    return sorted(root.glob("*/seed-*"))


def together(root: Path, delay: float) -> str:
    procs = []
    for _ in range(3):
        procs.append(study(root))
        time.sleep(delay)
    results = [(p.wait(), p.communicate()) for p in procs]
    logs = "".join(err for _, (_, err) in results)
    trained = sum("training images" in line for line in logs.splitlines())
    ok = all(consistent(run) for run in runs_of(root))
    return (f"{len(runs_of(root))} runs, {trained} trainings started, exit codes "
            f"{[code for code, _ in results]}, folders consistent: {ok}")


def killed(root: Path, reference: Path, rng: random.Random) -> str:
    a, b = study(root), study(root)
    moment = rng.uniform(3, 20)
    time.sleep(moment)
    a.kill()
    a.wait()
    b.wait()
    rest = study(root)
    rest.wait()
    same = all(metrics(run) == metrics(reference / run.parent.name / run.name)
               for run in runs_of(reference))
    ok = all(consistent(run) for run in runs_of(root))
    return (f"killed at {moment:.1f} s; survivor exit {b.returncode}, rerun exit "
            f"{rest.returncode}; metrics identical to uninterrupted: {same}; consistent: {ok}")


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    print("together:", together(work / "together", 0))
    print("3 s apart:", together(work / "apart", 3))
    ref = study(work / "reference")
    ref.wait()
    rng = random.Random(0)
    for trial in range(3):
        print(f"kill {trial + 1}:", killed(work / f"kill-{trial}", work / "reference", rng))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
