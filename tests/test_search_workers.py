"""Several workers on one search, and a search killed and rerun (issue 19, part 3): exact
trial counts on the journal file and on a real PostgreSQL server, nothing lost or repeated.
Trials are tiny (2 steps an epoch): the processes' start-up is most of the time."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import check_search, postgres_server

SPACE = """
[lr]
low = 0.005
high = 0.05
log = true

[optimizer]
choices = ["sgd", "adam"]

[nesterov]
choices = [false, true]
when = { optimizer = "sgd" }
"""
TINY = ["--data", "synthetic", "--subset", "64", "--val-split", "32", "--batch-size", "32",
        "--device", "cpu", "--quiet"]
EXE = str(Path(sys.executable).with_name("resnet-study"))


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


def _search(out: Path, space: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [EXE, "search", "--space", str(space), "--out", str(out), "--epochs", str(epochs),
            "--pruner", "none", *TINY, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_killed_search_goes_on_where_it_stood(space, tmp_path):
    """SIGKILL in the middle of a trial (its checkpoint written, its summary not): the rerun
    retries that trial in its folder, from its checkpoint, and loses or repeats nothing."""
    out = tmp_path / "s"
    proc = subprocess.Popen(_search(out, space, "--trials", "3"),
                            env=_env(), start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [
            run for run in out.glob("trials/trial-000[12]")
            if (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()]:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_search(out, space, "--trials", "3"), env=_env(), check=True,
                   capture_output=True)
    rows = check_search(out, 3, 2)
    dead = [r for r in rows if r["state"] == "FAIL"]
    assert len(dead) == 1 and dead[0]["outcome"] == "dead (its process ended)"
    retry = next(r for r in rows if r["retry_of"] == dead[0]["number"])
    assert retry["run"] == dead[0]["run"] and retry["state"] == "COMPLETE"
    log = (out / retry["run"] / "log.txt").read_text()
    assert "epochs 1-2 of 2" in log and "epochs 2-2 of 2" in log  # resumed after epoch 1


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_workers_together_run_exactly_the_trials_asked_for(space, tmp_path, storage):
    """Two workers on one search, four trials asked for: four in all, each number once, each in
    a folder of its own. On the journal, one command's `--workers 2`; on PostgreSQL, two
    commands, as on two machines."""
    with postgres_server() if storage == "postgresql" else contextlib.nullcontext() as url:
        command = _search(tmp_path / "s", space, "--trials", "4", epochs=1)
        commands = ([[*command, "--workers", "2"]] if url is None
                    else [[*command, "--storage", url]] * 2)
        procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for c in commands]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
        check_search(tmp_path / "s", 4, 1)
