"""Runs, and studies of runs in worker processes, survive SIGTERM, SIGINT, SIGKILL at any
moment, and failed writes."""

import csv
import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_study.cli import EXIT_INTERRUPTED, main

from .helpers import STOPS, TIMINGS, alive, stop

# Resumed runs are compared with the uninterrupted one exactly, in whatever precision `auto`
# picks here: with --deterministic a resumed run recomputes the very same steps.
TINY = ["--data", "synthetic", "--subset", "256", "--test-subset", "128", "--batch-size", "32",
        "--eval-batch-size", "128", "--epochs", "2", "--deterministic", "--quiet"]


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "resnet_study", "train", "resnet18-lr0.01", "--out", str(out),
            *TINY, *extra]


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def assert_every_file_whole(out: Path) -> None:
    """Each result file is absent or complete; a killed write leaves only a temp file."""
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert {"model", "optimizer", "epoch", "history"} <= set(ckpt)
    if (out / "metrics.csv").exists():
        rows = metrics(out)
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    for name in ("config.json", "summary.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    subprocess.run(train_command(out), check=True, capture_output=True)
    return metrics(out)


@pytest.mark.slow
def test_a_signal_checkpoints_mid_epoch_and_the_resumed_run_is_exact(reference, tmp_path):
    """SIGTERM, as a scheduler sends it; SIGINT goes to the same handler (`StopRequest`), and
    reaches a search's workers from the terminal in `test_search_stops.py`."""
    sig = signal.SIGTERM
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(out), stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.csv").exists():  # into epoch 2
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    last = err.strip().splitlines()[-1]
    assert f"stopped by {sig.name}" in last and "--resume" in last
    assert "Traceback" not in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] >= 1 and ckpt["partial"] is not None
    subprocess.run(train_command(out, "--resume"), check=True, capture_output=True)
    assert metrics(out) == reference


def kill_when(out: Path, moment) -> str:
    """Start the run (resuming if it has a checkpoint), SIGKILL it once `moment(proc)` returns,
    check that every file it left is whole, and say where it was."""
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    proc = subprocess.Popen(train_command(out, *resume), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    moment(proc)
    proc.kill()
    proc.wait()
    assert_every_file_whole(out)
    done = len(metrics(out)) if (out / "metrics.csv").exists() else 0
    return f"after {done} epoch(s), {'a' if (out / 'checkpoint.pt').exists() else 'no'} checkpoint"


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_metrics(reference, tmp_path):
    """One run killed three times, each time rerun by the same command (with --resume once it
    has a checkpoint): at a random moment of its first epoch, inside its first checkpoint write,
    and at a random moment of its second epoch. It ends as the uninterrupted run. The moments
    follow the run's own files, not the clock, so a loaded machine moves none of them past the
    run's end; the runs between kills are the first start's reruns, as a user's would be."""
    rng = random.Random(0)
    out = tmp_path / "run"

    def until(pattern: str, pause: bool):
        def moment(proc: subprocess.Popen) -> None:
            while proc.poll() is None and not list(out.glob(pattern)):
                time.sleep(0.0005)
            if pause:
                time.sleep(rng.uniform(0.05, 0.3))
        return moment

    points = [kill_when(out, until("config.json", pause=True)),  # in epoch 1
              "during a checkpoint write, "
              + kill_when(out, until(".checkpoint.pt.*.tmp", pause=False)),
              kill_when(out, until("checkpoint.pt", pause=True))]  # in epoch 2
    print("SIGKILL points:", points)
    assert len(set(points)) == 3 and "a checkpoint" in points[-1], points
    subprocess.run(train_command(out, "--resume"), check=True, capture_output=True)
    assert metrics(out) == reference, points
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_a_study_stopped_each_way_stops_its_workers_and_their_runs_checkpoint(tmp_path):
    """Two workers train two of three runs: stopped by SIGTERM, then (the same command rerun)
    by SIGKILL, each time both runs write a checkpoint and stop, the workers are gone, and the
    third run is never started. One study, rerun, serves both stops. Ctrl-C, which reaches the
    workers through the same pool (`workers`), is the search's stop in
    `test_search_stops.py`: a third stop here cost the suite 15 s."""
    out = tmp_path / "study"
    runs = [out / "resnet18-lr0.01" / f"seed-{seed}" for seed in range(3)]
    command = [sys.executable, "-m", "resnet_study", "study", "resnet18-lr0.01", "--seeds", "3",
               "--devices", "cpu,cpu", "--out", str(out), *TINY[:-4], "--epochs", "100"]
    for how in ("SIGTERM", "SIGKILL"):
        sig = STOPS[how]
        before = [len(metrics(run)) if (run / "metrics.csv").exists() else 0 for run in runs]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        while not all((run / "metrics.csv").exists() and len(metrics(run)) > done
                      for run, done in zip(runs[:2], before, strict=False)):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        workers = [int((run / ".lock").read_text().split()[1]) for run in runs[:2]]
        stop(proc, how)
        _, err = proc.communicate(timeout=120)  # the workers hold its stderr until they end
        assert not any(alive(pid) for pid in workers), how
        if sig:
            last = err.strip().splitlines()[-1]
            assert proc.returncode == EXIT_INTERRUPTED, err
            assert f"stopped by {sig}" in last and "run the same command again" in last
            assert "Traceback" not in err
        assert err.count(f"stopped by {sig or 'SIGTERM'} in epoch") == 2, err  # one signal each
        for run, done in zip(runs[:2], before, strict=False):
            ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
            assert done < ckpt["epoch"] < 100 and not (run / "summary.json").exists(), how
        assert not (runs[2] / "checkpoint.pt").exists()


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    PermissionError(errno.EACCES, "Permission denied"),
])
def test_a_failed_write_is_one_line_and_keeps_the_previous_checkpoint(failure, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's checkpoint: half written, then the disk fails
            f.write(b"PK\x03\x04 half a checkpoint")
            raise failure
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr("resnet_study.training.checkpoint.torch.save", save)
    code = main(["train", "resnet18-lr0.01", "--out", str(out), *TINY[:-1], "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert failure.strerror in err.strip().splitlines()[-1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1  # the previous checkpoint, whole
    assert not list(out.glob(".*.tmp"))
