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


MINE = '["mine"]\nextends = "resnet18-adam"\n["mine".train]\nlabel_smoothing = 0.1\n'


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_workers_together_run_exactly_the_trials_asked_for(space, tmp_path, storage):
    """Two workers on one search of the user's own experiment, four trials asked for: four in
    all, each number once, each in a folder of its own, each labelled as this process labels
    it. On the journal, one command's `--workers 2`; on PostgreSQL, two commands, as on two
    machines."""
    (tmp_path / "mine.toml").write_text(MINE)
    with postgres_server() if storage == "postgresql" else contextlib.nullcontext() as url:
        command = [*search_command(tmp_path / "s", space, "--trials", "4", epochs=1), "mine",
                   "--experiments", str(tmp_path / "mine.toml")]
        commands = ([[*command, "--workers", "2"]] if url is None
                    else [[*command, "--storage", url]] * 2)
        procs = [subprocess.Popen(c, env=quiet_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for c in commands]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
        check_search(tmp_path / "s", 4, 1)
    check_labels(tmp_path / "s", tmp_path / "mine.toml")


def test_one_worker_labels_a_users_experiment_as_two_do(space, tmp_path):
    """Issue 30: spawned workers never loaded --experiments, and recorded every trial of a
    user's experiment as `custom` with no settings, where one worker (this process) named its
    departures. One worker's labels, checked as two workers' are above."""
    (tmp_path / "mine.toml").write_text(MINE)
    assert main([*search_command(tmp_path / "s", space, "--trials", "2", epochs=1)[1:], "mine",
                 "--experiments", str(tmp_path / "mine.toml")]) == 0
    check_labels(tmp_path / "s", tmp_path / "mine.toml")


def check_labels(out: Path, mine: Path) -> None:
    """Each trial's label is its departures from the user's entry: fidelity and knobs. The
    first trial is the entry itself (queued), the others departures drawn."""
    entry = PRESETS.with_files([mine]).get("mine")
    fidelity = {"epochs": 1, "subset": 64, "val_split": 32, "batch_size": 32}
    rows = search_trials(out)
    assert [r["paper_row"] for r in rows] == ["mine"] + [""] * (len(rows) - 1)
    for row in rows:
        params = {k: json.loads(row[k].lower()) if row[k] in ("True", "False")
                  else type(getattr(entry.train, k))(row[k])
                  for k in ("lr", "optimizer", "nesterov") if row[k]}
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert summary["settings"] == entry.replace(**fidelity, **params).settings, row
        assert summary["settings"].startswith("custom: ")
        assert ("lr=" in summary["settings"]) == (not row["paper_row"])
