"""Several workers on one search, and a search killed and rerun (issue 19, part 3): exact
trial counts on the journal file and on a real PostgreSQL server, nothing lost or repeated.
Trials are tiny (2 steps an epoch): the processes' start-up is most of the time."""

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from resnet_study.catalogue import PRESETS
from resnet_study.cli import main

from .helpers import (
    SEARCH_SPACE,
    check_search,
    postgres_server,
    quiet_env,
    search_command,
    search_trials,
)


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SEARCH_SPACE)
    return path


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_workers_together_run_exactly_the_trials_asked_for(space, tmp_path, storage):
    """Two workers on one search, four trials asked for: four in all, each number once, each in
    a folder of its own. On the journal, one command's `--workers 2`; on PostgreSQL, two
    commands, as on two machines."""
    with postgres_server() if storage == "postgresql" else contextlib.nullcontext() as url:
        command = search_command(tmp_path / "s", space, "--trials", "4", epochs=1)
        commands = ([[*command, "--workers", "2"]] if url is None
                    else [[*command, "--storage", url]] * 2)
        procs = [subprocess.Popen(c, env=quiet_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for c in commands]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
        check_search(tmp_path / "s", 4, 1)


def test_a_users_experiment_is_labelled_alike_by_one_worker_and_by_two(space, tmp_path):
    """Issue 30: spawned workers never loaded --experiments, and recorded every trial of a
    user's experiment as `custom` with no settings. Each trial's label is its departures from
    the user's entry, whichever process computes it."""
    mine = tmp_path / "mine.toml"
    mine.write_text('["mine"]\nextends = "resnet18-adam"\n["mine".train]\n'
                    "label_smoothing = 0.1\n")
    entry = PRESETS.with_files([mine]).get("mine")
    fidelity = {"epochs": 1, "subset": 64, "val_split": 32, "batch_size": 32}
    for workers in ("1", "2"):  # one: in this process; two: spawned
        out = tmp_path / f"workers-{workers}"
        command = [*search_command(out, space, "--trials", "2", "--workers", workers, epochs=1),
                   "mine", "--experiments", str(mine)]
        if workers == "1":
            assert main(command[1:]) == 0
        else:
            subprocess.run(command, env=quiet_env(), check=True, capture_output=True, timeout=300)
        for row in search_trials(out):
            params = {k: json.loads(row[k].lower()) if row[k] in ("True", "False")
                      else type(getattr(entry.train, k))(row[k])
                      for k in ("lr", "optimizer", "nesterov") if row[k]}
            summary = json.loads((out / row["run"] / "summary.json").read_text())
            expected = entry.replace(**fidelity, **params)
            assert summary["settings"] == expected.settings, (workers, row)
            assert summary["settings"].startswith("custom: ") and "lr=" in summary["settings"]
