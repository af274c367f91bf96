"""Every experiment x seed into one directory: resumable, shardable, and no run stops the rest.

The study keeps no state of its own: each run's directory says what happened to it
(`summary.json` for a finished run, `checkpoint.pt` for an interrupted one), so rerunning the
same command, or several shards of it on several machines, picks up exactly what is left.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from .config import Experiment, UsageError, get_experiment
from .files import write_json

# Well under a minute per base-model run on a laptop CPU: enough to exercise every code path
# and draw every figure, nowhere near the paper's protocol (and marked quick in every output).
QUICK = {"epochs": 3, "subset": 1000, "test_subset": 1000}
FINAL = {"completed", "diverged"}  # outcomes a rerun would only repeat


@dataclasses.dataclass(frozen=True)
class Run:
    experiment: Experiment  # seed and overrides applied
    out: Path

    @property
    def label(self) -> str:
        return f"{self.experiment.name}/seed-{self.experiment.train.seed}"


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n`, 1-based as in SLURM arrays' usual use: --shard 1/4 .. --shard 4/4."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes i/n (e.g. 2/4), not {text!r}") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def plan(names: list[str], seeds: int, root: Path, overrides: dict, quick: bool,
         shard: tuple[int, int] = (1, 1)) -> list[Run]:
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, not {seeds}")
    runs = []
    for name in names:
        base = get_experiment(name).replace(**{**(QUICK if quick else {}), **overrides})
        if quick:
            base = dataclasses.replace(base, profile="quick")
        for seed in range(seeds):
            runs.append(Run(base.replace(seed=seed), root / name / f"seed-{seed}"))
    i, n = shard
    return runs[i - 1::n]


def status(run: Run) -> str:
    """completed / diverged / failed from the run's summary; partial or new otherwise."""
    summary = run.out / "summary.json"
    if summary.is_file():
        try:
            state = json.loads(summary.read_text()).get("status", "failed")
        except (OSError, ValueError):
            state = "failed"
        if state in FINAL or not (run.out / "checkpoint.pt").exists():
            return state
    return "partial" if (run.out / "checkpoint.pt").exists() else "new"


def execute(run: Run, device: str | None = None) -> dict:
    """Train one run (resuming it if it was interrupted); a failure becomes its summary."""
    from .train import train

    exp = run.experiment if device is None else run.experiment.replace(device=device)
    try:
        return train(exp, run.out, resume=(run.out / "checkpoint.pt").exists(), quiet=True)
    except Exception as e:  # out of memory, weights offline, bad data: record it and go on
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        summary = {"experiment": exp.name, "seed": exp.train.seed, "status": "failed",
                   "error": reason, "profile": exp.profile}
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "summary.json", summary)
        return summary


_worker_device: str | None = None


def _claim_device(devices: mp.Queue) -> None:
    global _worker_device
    _worker_device = devices.get()


def _execute_on_worker_device(run: Run) -> dict:
    return execute(run, _worker_device)


def run_study(runs: list[Run], devices: list[str] | None = None, log=None) -> dict[str, list]:
    """Run what is left of `runs`, one per device at a time; returns run labels by outcome."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    outcomes: dict[str, list[str]] = {"completed": [], "diverged": [], "failed": [],
                                      "skipped": []}
    todo = []
    for run in runs:
        state = status(run)
        if state in FINAL:
            outcomes["skipped"].append(run.label)
            outcomes[state].append(run.label)
        else:
            todo.append(run)
    log(f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to go")
    start, done = time.monotonic(), 0
    workers = max(1, len(devices or []))

    def progress(run: Run, summary: dict) -> None:
        nonlocal done
        done += 1
        outcomes[summary["status"]].append(run.label)
        left = len(todo) - done
        eta = (time.monotonic() - start) / done * left / workers
        running = min(workers, left)
        failed = len(outcomes["failed"]) + len(outcomes["diverged"])
        note = f" ({summary.get('error', '')})" if summary["status"] == "failed" else ""
        log(f"study: {run.label} {summary['status']}{note} | {done}/{len(todo)} done, "
            f"{running} running, {failed} failed, ~{_duration(eta)} left")

    if devices:
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        queue = ctx.Queue()
        for d in devices:
            queue.put(d)
        with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_claim_device,
                                 initargs=(queue,)) as pool:
            pending: dict[Future, Run] = {pool.submit(_execute_on_worker_device, r): r
                                          for r in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    run = pending.pop(f)
                    try:
                        summary = f.result()
                    except Exception as e:  # the worker itself died (e.g. killed for memory)
                        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                    progress(run, summary)
    else:
        for run in todo:
            progress(run, execute(run))
    return outcomes


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
