"""Every experiment x seed into one directory: resumable, shardable, and no run stops the rest.

The study keeps no state of its own: each run's folder says what happened to it
(`RunFolder.state`), so rerunning the same command, or several shards of it on several
machines, picks up exactly what is left. Runs at once go to the worker pool (`workers`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import RECIPE_SECTIONS, Experiment, differences
from .data.sources import ImageSet
from .data.splits import check_sizes
from .data.store import load_images
from .errors import UsageError, one_line
from .files import FolderHeld
from .models import network, training_flops
from .training.assembly import assemble
from .training.callbacks import OnEpoch
from .training.device import resolve_device
from .training.run_folder import FINAL, RunFolder
from .training.trackers import Tracking
from .training.trackers import check as check_trackers
from .training.train import run_in_folder
from .workers import Worker, run_jobs

# Well under a minute per base-model run on a laptop CPU: enough to exercise every code path
# and draw every figure, nowhere near the paper's protocol (and marked quick in every output).
QUICK = {"epochs": 3, "subset": 1000, "test_subset": 1000}
# The most runs `--runs-per-device auto` puts on one GPU: four eager runs at once gave 3.06x the
# throughput of one on an H200 (benchmarks/RESULTS.md, a7f281c); more were not measured.
MAX_RUNS_PER_GPU = 4
MEMORY_HEADROOM = 0.8  # of the GPU's free memory, the share that the runs may plan to use


@dataclasses.dataclass(frozen=True)
class Run:
    experiment: Experiment  # seed and overrides applied
    out: Path

    @property
    def label(self) -> str:
        return f"{self.experiment.name}/seed-{self.experiment.train.seed}"

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out)

    @property
    def tracking(self) -> Tracking:
        """A run of the MLflow experiment named after the study's folder."""
        return Tracking.of(self.out.parent.parent, self.label)


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n`, 1-based as in SLURM arrays' usual use: --shard 1/4 .. --shard 4/4."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes i/n (e.g. 2/4), not {text!r}") from None
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def plan(experiments: list[Experiment], seeds: int, root: Path, overrides: dict, quick: bool,
         shard: tuple[int, int] = (1, 1)) -> list[Run]:
    """The study's runs: each experiment (from the catalogue, so labelled by its entry) with
    the command's overrides, at seeds 0..N-1; the i-th of n shards of them."""
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, not {seeds}")
    runs = []
    for exp in experiments:
        name = exp.name
        base = exp.replace(**{**(QUICK if quick else {}), **overrides})
        if quick:
            base = dataclasses.replace(base, quick=True)
        for seed in range(seeds):
            runs.append(Run(base.replace(seed=seed), root / name / f"seed-{seed}"))
    i, n = shard
    return runs[i - 1::n]


def check_folders(runs: list[Run]) -> None:
    """Refuse a study whose folder holds runs trained with another recipe: a rerun would count
    them as done (or resume them) under settings they never had. Execution settings (device,
    precision, ...) are not differences; a config.json that cannot be read is left to the run,
    which reports it."""
    for run in runs:
        try:
            old = run.folder.experiment()
        except UsageError:
            continue
        difference = next(differences(old, run.experiment, RECIPE_SECTIONS), None)
        if difference is not None:
            name, before, now = difference
            raise UsageError(f"{run.label} was trained with {name}={before!r}, not {now!r}; "
                             "choose another --out")


def execute(run: Run, device: str | None = None,
            on_epoch: Callable[[Run, dict], None] | None = None) -> dict:
    """Train one run (resuming it if it was interrupted) under its folder's lock, so that
    several processes on one study share its runs: one that another process holds is left to
    it (status `held`)."""
    exp = run.experiment if device is None else run.experiment.replace(device=device)
    callbacks = [] if on_epoch is None else [OnEpoch(lambda exp, row: on_epoch(run, row))]
    try:
        with run.folder.hold():
            return run_in_folder(exp, run.folder, callbacks=callbacks, tracking=run.tracking)
    except FolderHeld as e:
        return {"status": "held", "error": e.holder}


def prepare(runs: list[Run], root: Path,
            devices: list[str] | None) -> tuple[dict[str, ImageSet], bool]:
    """Resolve, once and before any run starts, what every run needs: its devices, its data
    (download, md5 check, decode, cache), a writable study folder and its trackers' store
    (`--log mlflow`). A fault there would fail
    every run alike; raised here it is one line and leaves no run directory behind. Returns the
    data sets by name and whether the study runs on CPUs alone."""
    resolved = [resolve_device(d) for d in devices
                or dict.fromkeys(r.experiment.execution.device for r in runs)]
    images = {spec: load_images(spec) for spec in dict.fromkeys(r.experiment.data.data
                                                                for r in runs)}
    for run in runs:
        exp = run.experiment
        try:
            check_sizes(exp, len(images[exp.data.data].train_labels))
        except UsageError as e:
            raise UsageError(f"{run.label}: {e}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise UsageError(f"cannot write the study to {root} ({e.strerror or e}); "
                         "choose another --out") from None
    check_trackers({name for r in runs for name in r.experiment.execution.log},
                   Tracking.of(root, ""))
    return images, all(d.type == "cpu" for d in resolved)


class Clock:
    """The study's wall time, estimated from its first epoch and then from every epoch done.

    Runs differ in cost: a run's epoch weighs its training FLOPs per image times its images
    (the test pass counted as a third of a training step), so one measured epoch of any run
    prices all of them. Epochs of runs still going count as done: with several workers, the
    finished runs alone made the time left look workers-times longer.
    """

    def __init__(self, todo: list[Run], images: dict[str, ImageSet], workers: int) -> None:
        self.workers = workers
        self.per_epoch = {r.label: _epoch_cost(r, images[r.experiment.data.data]) for r in todo}
        self.left = {r.label: (r.experiment.train.epochs - _epochs_done(r)) * self.per_epoch[
            r.label] for r in todo}
        self.start = time.monotonic()
        self.seconds_per_cost: float | None = None
        self.done = 0.0

    def epoch(self, run: Run, row: dict) -> float | None:
        """Count an epoch of `run` done. The whole study's estimated wall time, once: from the
        first epoch measured (None after)."""
        total = None
        if self.seconds_per_cost is None:
            self.seconds_per_cost = row["epoch_seconds"] / self.per_epoch[run.label]
            total = self.seconds_per_cost * sum(self.left.values()) / self.workers
        self.done += self.per_epoch[run.label]
        self.left[run.label] = max(0.0, self.left[run.label] - self.per_epoch[run.label])
        return total

    def estimate(self, run: Run) -> float:
        """The estimated wall time of all that is left of `run`, at the first epoch's pace."""
        return self.seconds_per_cost * self.left[run.label]

    def finished(self, run: Run) -> float | None:
        """Seconds left after `run`, at the pace of all the epochs done so far (what `run` did
        not train, stopped or diverged early, is not left)."""
        self.left.pop(run.label)
        if self.done:
            return (time.monotonic() - self.start) / self.done * sum(self.left.values())
        return None


def _epoch_cost(run: Run, images: ImageSet) -> float:
    """FLOPs of one epoch: training images x a step's FLOPs, evaluated images x a third."""
    d = run.experiment.data
    train = check_sizes(run.experiment, len(images.train_labels))
    test = len(images.test_labels)
    test = min(test, d.test_subset) if d.test_subset else test
    flops = training_flops(run.experiment.model, len(images.classes))
    return flops * (train + (test + d.val_split) / 3)


def _epochs_done(run: Run) -> int:
    """Epochs an interrupted run has behind it (its metrics.csv rows); 0 for a new run."""
    return len(run.folder.history())


def runs_that_fit(free_bytes: int, run_bytes: int) -> int:
    """How many runs of `run_bytes` each share a GPU with `free_bytes` free: as many as fit in
    its headroom, at least one, at most `MAX_RUNS_PER_GPU`."""
    return max(1, min(MAX_RUNS_PER_GPU, int(free_bytes * MEMORY_HEADROOM // run_bytes)))


def auto_runs_per_device(device_name: str, todo: list[Run],
                         images: dict[str, ImageSet]) -> tuple[int, str]:
    """`--runs-per-device auto`: one on a CPU, whose cores one run's kernels already share;
    on a GPU, as many as its free memory holds, each run's need measured by one training step
    of the study's costliest run (plus its images on the device), up to `MAX_RUNS_PER_GPU`."""
    device = resolve_device(device_name)
    if device.type != "cuda":
        return 1, "one on a CPU"
    run = max(todo, key=lambda r: _epoch_cost(r, images[r.experiment.data.data]))
    exp, data = run.experiment, images[run.experiment.data.data]
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    exp = exp.replace(device=str(device))
    parts = assemble(exp, model=network(exp.model, len(data.classes)), steps_per_epoch=1)
    x = torch.randn(exp.train.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, len(data.classes), (exp.train.batch_size,), device=device)
    parts.step(x.to(memory_format=torch.channels_last if exp.execution.channels_last
                    else torch.contiguous_format), y, 1.0)
    step_bytes = torch.cuda.max_memory_allocated(device) - before
    del parts, x, y
    torch.cuda.empty_cache()
    run_bytes = step_bytes + data.train_images.nbytes + data.test_images.nbytes + 2**30
    free, _ = torch.cuda.mem_get_info(device)
    n = runs_that_fit(free, run_bytes)
    return n, (f"{free / 2**30:.0f} GiB free, about {run_bytes / 2**30:.1f} GiB per "
               f"{run.experiment.name} run, at most {MAX_RUNS_PER_GPU}")


def run_study(runs: list[Run], devices: list[str] | None = None, runs_per_device: int | None = 1,
              log=None) -> dict[str, list]:
    """Run what is left of `runs`, `runs_per_device` at a time on each device (None: chosen by
    `auto_runs_per_device`); returns run labels by outcome. Several runs at once, or runs on
    listed devices, are worker processes; one run at a time on one device runs in this one."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_folders(runs)
    outcomes: dict[str, list[str]] = {"completed": [], "diverged": [], "stopped": [],
                                      "failed": [], "skipped": [], "held": []}
    todo = []
    for run in runs:
        state = run.folder.state()
        if state in FINAL:
            outcomes["skipped"].append(run.label)
            outcomes[state].append(run.label)
        else:
            todo.append(run)
    plan_line = (f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, "
                 f"{len(todo)} to go")
    if not todo:
        log(plan_line)
        return outcomes
    root = Path(os.path.commonpath([r.out.parent.parent for r in todo]))
    images, on_cpu = prepare(todo, root, devices)
    log(plan_line)
    devices = _worker_devices(todo, devices, runs_per_device, images, log)
    news = _Progress(todo, outcomes, Clock(todo, images, max(1, len(devices or []))), on_cpu, log)
    if devices:
        _in_workers(todo, devices, news)
    else:
        for run in todo:
            news.finished(run, execute(run, on_epoch=news.epoch))
    return outcomes


def _worker_devices(todo: list[Run], devices: list[str] | None, runs_per_device: int | None,
                    images: dict[str, ImageSet], log) -> list[str] | None:
    """One entry per worker process, each naming its device; None: run here, one at a time."""
    if runs_per_device is None:
        runs_per_device, why = auto_runs_per_device(
            (devices or [todo[0].experiment.execution.device])[0], todo, images)
        if runs_per_device > 1:
            log(f"study: {runs_per_device} runs at once per device ({why}; "
                "--runs-per-device N overrides)")
    if runs_per_device > 1:
        devices = devices or [todo[0].experiment.execution.device]
    return [d for d in devices for _ in range(runs_per_device)] if devices else None


@dataclasses.dataclass
class _Progress:
    """What the study says as its runs go: the whole study's estimate after a first epoch, and
    each run's outcome with what is left."""

    todo: list[Run]
    outcomes: dict[str, list[str]]
    clock: Clock
    on_cpu: bool
    log: Callable[[str], None]
    done: int = 0

    def epoch(self, run: Run, row: dict) -> None:
        total = self.clock.epoch(run, row)
        if total is None:
            return
        self.log(f"study: about {_duration(total)} in all on this machine ({run.label} about "
                 f"{_duration(self.clock.estimate(run))} more), from its first epoch "
                 f"({row['epoch_seconds']:.1f} s)")
        if total > 3600 and self.on_cpu:
            self.log("study: that is long on a CPU: add --quick for a short try of every "
                     "experiment (not the paper's protocol), or run it on a GPU (docs/speed.md)")

    def finished(self, run: Run, summary: dict) -> None:
        self.done += 1
        self.outcomes[summary["status"]].append(run.label)
        if summary.get("skipped"):
            self.outcomes["skipped"].append(run.label)
        left = self.clock.finished(run)
        running = min(self.clock.workers, len(self.todo) - self.done)
        failed = len(self.outcomes["failed"]) + len(self.outcomes["diverged"])
        note = {"failed": f" ({summary.get('error', '')})",
                "held": f" by {summary.get('error', '')}: left to it"}.get(summary["status"], "")
        note += " (by another process: skipped)" if summary.get("skipped") else ""
        eta = (f", ~{_duration(left)} left"
               if left is not None and self.done < len(self.todo) else "")
        self.log(f"study: {run.label} {summary['status']}{note} | {self.done}/{len(self.todo)} "
                 f"done, {running} running, {failed} failed{eta}")


def _in_workers(todo: list[Run], devices: list[str], news: _Progress) -> None:
    """Each run in a worker of the pool (`workers`), one per entry of `devices`."""
    def done(run: Run, result: dict | Exception) -> None:
        if isinstance(result, Exception):  # the worker itself died: killed for memory, say
            result = {"status": "failed", "error": one_line(result)}
        news.finished(run, result)

    run_jobs(_run_on_worker, todo, devices, on_done=done,
             on_message=lambda message: news.epoch(*message))


def _run_on_worker(run: Run, worker: Worker) -> dict:
    return execute(run, worker.device, lambda run, row: worker.tell((run, row)))


def _duration(seconds: float) -> str:
    """45s, 12m, 3h05m, 2d07h: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{round(seconds)}s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 48 * 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    hours = round(seconds / 3600)
    return f"{hours // 24}d{hours % 24:02d}h"
