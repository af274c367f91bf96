"""A search stopped by a signal (issue 30): SIGTERM, Ctrl-C and SIGKILL of a `search --workers
2` stop both workers' trials with checkpoints, and the same command goes on to exactly the
trials asked for, as a study does (`test_faults.py`)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_study.cli import main

from .helpers import SEARCH_SPACE, check_search, quiet_env, search_command


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SEARCH_SPACE)
    return path


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def training(out: Path) -> list[Path]:
    """The trial folders whose runs are past their first epoch and not finished."""
    return [run for run in out.glob("trials/trial-*")
            if (run / "metrics.csv").exists() and not (run / "summary.json").exists()]


EPOCHS = 5  # long enough that both workers are mid-trial when the signal comes


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM to the search", "Ctrl-C in its terminal",
                                  "SIGKILL of the search"])
def test_a_stopped_search_stops_its_workers_and_goes_on_to_exactly_its_trials(stop, space,
                                                                               tmp_path):
    """Issue 30: two workers, each mid-trial. However the search is stopped, both trials
    write a checkpoint and stop, no worker is left running, and the same command then retries
    both trials from their checkpoints and ends with exactly the trials asked for."""
    out = tmp_path / "s"
    command = search_command(out, space, "--trials", "2", "--workers", "2", epochs=EPOCHS)
    proc = subprocess.Popen(command, env=quiet_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(training(out)) < 2:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    workers = [int((run / ".lock").read_text().split()[1]) for run in training(out)]
    if stop == "SIGTERM to the search":
        proc.terminate()
    elif stop == "Ctrl-C in its terminal":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal signals its whole foreground group
    else:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))
    sig = {"SIGTERM to the search": "SIGTERM", "Ctrl-C in its terminal": "SIGINT"}.get(stop)
    if sig:
        assert proc.returncode == 75 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert f"stopped by {sig}" in last and "run the same command again" in last
    stopped = training(out)
    assert len(stopped) == 2  # checkpointed mid-run, no summary
    for run in stopped:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert 1 <= ckpt["epoch"] < EPOCHS
    assert main(command[1:]) == 0  # the same command, in this process
    rows = check_search(out, 2, EPOCHS)
    dead = [r for r in rows if r["state"] == "FAIL"]
    assert {out / r["run"] for r in dead} == set(stopped)
    for r in dead:
        retry = next(t for t in rows if t["retry_of"] == r["number"])
        assert retry["run"] == r["run"] and retry["state"] == "COMPLETE"
        log = (out / retry["run"] / "log.txt").read_text()
        assert f"epochs 1-{EPOCHS} of {EPOCHS}" in log and log.count(f"of {EPOCHS}\n") >= 2
