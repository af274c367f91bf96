"""Issue 19's acceptance search on the CIFAR-10 stand-in: a real search on the CPU, SIGKILLed at
three random moments and rerun each time, then its best.toml confirmed on the test split.

    python benchmarks/search_standin.py WORKDIR [--data PATH] [--kills 3]

Prints the kill moments, the search's wall time (restarts included), the trials by state and
epoch reached, and the confirmation study's Welch comparison. Numbers measured with it are on
the CIFAR-10 stand-in, not CIFAR-100.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

FIDELITY = ["--subset", "10000", "--epochs", "10"]
SEARCH = [*FIDELITY, "--val-split", "5000", "--trials", "24", "--max-gflop-per-image", "0.25",
          "--quiet"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2]
                                              / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--window", type=float, default=1500, help="kill within this many s")
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("resnet-study"))
    out = args.workdir / "search"
    command = [exe, "search", "--data", args.data, "--out", str(out), *SEARCH]
    moments = sorted(random.uniform(60, args.window) for _ in range(args.kills))
    print("kill moments (s from the start):", ", ".join(f"{m:.0f}" for m in moments), flush=True)
    start = time.monotonic()
    for moment in moments:
        proc = subprocess.Popen(command, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, moment - (time.monotonic() - start)))
            print(f"search ended (exit {proc.returncode}) before the kill at {moment:.0f} s")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"SIGKILL at {time.monotonic() - start:.0f} s", flush=True)
    subprocess.run(command, check=True)
    wall = time.monotonic() - start
    with open(out / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    counted = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    completed_runs = [t["run"] for t in trials if t["state"] == "COMPLETE"]
    print(json.dumps({
        "wall_seconds": round(wall), "trials": len(counted),
        "states": Counter(t["state"] for t in trials),
        "pruned_at_epoch": Counter(t["epochs"] for t in trials if t["state"] == "PRUNED"),
        "completed_run_folders_unique": len(completed_runs) == len(set(completed_runs)),
        "retried": [t["number"] for t in trials if t["retry_of"]]}, indent=1), flush=True)
    best = next(iter(tomllib.loads((out / "best.toml").read_text())))
    confirm = args.workdir / "confirm"
    subprocess.run([exe, "study", best, "resnet18-lr0.01", "--experiments", str(out / "best.toml"),
                    "--data", args.data, "--seeds", "2", "--out", str(confirm), *FIDELITY],
                   check=True)
    subprocess.run([exe, "report", str(confirm), "--no-inspect"], check=True)
    with open(confirm / "report" / "table1.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["n"]:
                print(row["experiment"], row["top1_mean"], row["top1_std"], row["n"])
    with open(confirm / "report" / "statistics.csv", newline="") as f:
        for row in csv.DictReader(f):
            print(row["sentence"])


if __name__ == "__main__":
    main()
