"""A search stopped by a signal (issue 30): Ctrl-C and SIGKILL of a `search --workers 2` stop
both workers' trials with checkpoints, and the same command goes on to exactly the trials asked
for, as a study does (`test_faults.py`). SIGTERM is the study's stop there: it reaches the
workers through the same pool (`workers`), and a third stop here cost the suite 25 s."""

import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_study.cli import main

from .helpers import SEARCH_SPACE, STOPS, alive, check_search, quiet_env, search_command, stop


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SEARCH_SPACE)
    return path


def epochs(run: Path) -> int:
    try:
        return len((run / "metrics.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def training(out: Path, before: dict[Path, int]) -> list[Path]:
    """The trial folders whose runs trained an epoch since `before` and are not finished."""
    return [run for run in out.glob("trials/trial-*/epochs-*")
            if epochs(run) > before.get(run, 0) and not (run / "summary.json").exists()]


EPOCHS = 8  # enough that each invocation stops both trials in the middle
# Ctrl-C (the pool's handler, from the terminal's process group) and SIGKILL (no handler: the
# journal's dead-trial check).
SEARCH_STOPS = ["Ctrl-C in its terminal", "SIGKILL"]


def stop_mid_trial(command: list[str], out: Path, how: str) -> list[Path]:
    """Start the search, stop it `how` a user would (STOPS) once both workers have trained an
    epoch of their trials, and check what the stop leaves: no worker after 30 s, one line (exit
    75) where the search could say it, both trials checkpointed mid-run. Returns their
    folders."""
    before = {run: epochs(run) for run in out.glob("trials/trial-*/epochs-*")}
    proc = subprocess.Popen(command, env=quiet_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(training(out, before)) < 2:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    workers = [int((run / ".lock").read_text().split()[1]) for run in training(out, before)]
    stop(proc, how)
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), how
    if STOPS[how]:
        assert proc.returncode == 75 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert f"stopped by {STOPS[how]}" in last and "run the same command again" in last
    stopped = training(out, before)
    assert len(stopped) == 2, how  # checkpointed mid-run, no summary
    for run in stopped:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert before.get(run, 0) < ckpt["epoch"] == epochs(run) < EPOCHS, how
    return stopped


@pytest.mark.slow
def test_a_search_stopped_each_way_goes_on_to_exactly_its_trials(space, tmp_path):
    """Issue 30: two workers, each mid-trial, stopped by Ctrl-C, then (the same command rerun)
    by SIGKILL. Each time both trials write a checkpoint and stop and no worker is left
    running; each rerun retries both trials from their checkpoints, and the last ends with
    exactly the trials asked for. One search, rerun, serves both stops."""
    out = tmp_path / "s"
    command = search_command(out, space, "--trials", "2", "--workers", "2", epochs=EPOCHS)
    stopped = {run for how in SEARCH_STOPS for run in stop_mid_trial(command, out, how)}
    assert main(command[1:]) == 0  # the same command, in this process
    rows = check_search(out, 2, EPOCHS)
    assert {out / r["run"] for r in rows} == stopped
    failed = [r["outcome"] for r in rows if r["state"] == "FAIL"]
    assert failed == ["stopped"] * 2 * len(SEARCH_STOPS), failed  # each stop, each trial
    for run in stopped:
        log = (run / "log.txt").read_text()
        assert f"epochs 1-{EPOCHS} of {EPOCHS}" in log
        assert log.count(f"of {EPOCHS}\n") == 1 + len(SEARCH_STOPS)  # started, then resumed


def test_a_stopped_trial_is_retried_however_often_a_dead_one_max_retries_times():
    """A search stopped and rerun session after session keeps its trials; a trial whose process
    keeps dying (a crash, SIGKILL of the worker itself) is given up after MAX_RETRIES."""
    import optuna

    from resnet_study.search.storage import MAX_RETRIES, retry

    study = optuna.create_study()
    for outcome, deaths in (("stopped", MAX_RETRIES), ("running", MAX_RETRIES - 1),
                            ("running", MAX_RETRIES)):
        study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.FAIL, params={"x": 1.0},
            distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
            user_attrs={"outcome": outcome, "deaths": deaths}))
    for trial in study.get_trials():
        retry(study, trial)
    queued = [t for t in study.get_trials() if t.state.name == "WAITING"]
    assert [(t.system_attrs["failed_trial"], t.user_attrs["deaths"]) for t in queued] == [
        (0, MAX_RETRIES), (1, MAX_RETRIES)]
