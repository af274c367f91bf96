"""`resnet-study search` (issue 19, part 3): Optuna's study over a space file, choosing on a
validation split only, exact in its trial count with several workers (journal file and a real
PostgreSQL server), and whole after SIGKILL."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from resnet_study.cli import main
from resnet_study.config import EXPERIMENTS, GROUPS, get_experiment
from resnet_study.search.space import load_space

from .helpers import postgres_server

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


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.toml"
    path.write_text(SPACE)
    return path


def trials(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_trials(out: Path, asked: int, epochs: int) -> list[dict]:
    """The search holds `asked` finished trials with unique numbers, each with a run folder of
    its own that says what the trial says."""
    rows = trials(out)
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(done) == asked, [(r["number"], r["state"], r["outcome"]) for r in rows]
    assert len({r["number"] for r in rows}) == len(rows)
    assert len({r["run"] for r in done}) == asked
    for r in done:
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        assert summary["epochs"] == int(r["epochs"])
        if r["state"] == "COMPLETE":
            assert summary["status"] == "completed" and summary["epochs"] == epochs
            assert summary["val_top1"] == pytest.approx(float(r["value"]))
        else:
            assert summary["status"] == "stopped" and summary["epochs"] < epochs
    return rows


@pytest.fixture(scope="module")
def searched(space, tmp_path_factory):
    """A search through the command line, in this process, with every evaluation recorded."""
    import resnet_study.training.epoch as epoch

    out = tmp_path_factory.mktemp("search") / "s"
    evaluated = []
    evaluate = epoch.evaluate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(epoch, "evaluate", lambda model, loader, amp: evaluated.append(
            loader.num_images) or evaluate(model, loader, amp))
        assert main(["search", "--space", str(space), "--out", str(out), "--trials", "4",
                     "--epochs", "3", "--test-subset", "48", *TINY]) == 0
    return out, evaluated


def test_a_search_chooses_on_validation_images_and_never_evaluates_the_test_split(searched):
    out, evaluated = searched
    assert evaluated and set(evaluated) == {32}  # the 32 validation images; the test has 48
    rows = check_trials(out, 4, 3)
    for r in rows:
        run = out / r["run"]
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert "val_top1" in header and not [c for c in header if c.startswith("test_")]
        assert json.loads((run / "config.json").read_text())["execution"]["test_split"] is False
        assert json.loads((run / "summary.json").read_text())["test_top1"] is None


def test_the_papers_rows_that_fit_the_space_come_first(searched):
    """Of the paper's rows, the space above expresses the base model (SGD at 0.01) and Adam."""
    out, _ = searched
    rows = trials(out)
    assert [r["paper_row"] for r in rows[:2]] == ["resnet18-lr0.01", "resnet18-adam"]
    assert not any(r["paper_row"] for r in rows[2:])
    assert rows[1]["nesterov"] == "" and rows[1]["optimizer"] == "adam"  # conditional: no nesterov


def test_the_search_writes_its_best_as_an_experiment_and_draws_optunas_figures(searched, capsys):
    out, _ = searched
    rows = [r for r in trials(out) if r["state"] == "COMPLETE"]
    best = max(rows, key=lambda r: float(r["value"]))
    entry = tomllib.loads((out / "best.toml").read_text())
    name = next(iter(entry))
    assert entry[name]["extends"] == "resnet18-lr0.01" and "test set" in entry[name]["notes"]
    assert main(["experiments", "--json", "--experiments", str(out / "best.toml")]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[name]["lr"] == pytest.approx(float(best["lr"]))
    assert listed[name]["optimizer"] == best["optimizer"] and listed[name]["epochs"] == 25
    page = (out / "index.html").read_text()
    for figure in ("history", "importances", "parallel", "intermediate"):
        assert (out / f"search-{figure}.png").stat().st_size > 1000
    assert page.count("<img") == 4 and "never on the test set" in page


def test_a_folder_holding_another_search_is_refused_with_the_difference(searched, space, capsys):
    out, _ = searched
    assert main(["search", "--space", str(space), "--out", str(out), "--trials", "4",
                 "--epochs", "2", "--test-subset", "48", *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds another search (recipe.train.epochs: 3, not 2)" in err
    assert main(["search", "--out", str(out), "--trials", "4", "--epochs", "3",
                 "--test-subset", "48", *TINY]) == 2  # the default space, not the file's
    assert "holds another search (space." in capsys.readouterr().err
    assert main(["search", "--space", str(space), "--out", str(out), "--trials", "4",
                 "--epochs", "3", "--test-subset", "48", *TINY, "--device", "cpu",
                 "--precision", "fp32"]) == 0  # execution settings are no difference


@pytest.mark.parametrize("args, message", [
    (["--storage", "postgresql://nobody@127.0.0.1:9/none"], "--storage postgresql://nobody@"
                                                           "127.0.0.1:9/none: cannot open it"),
    (["--storage", "postgresql://u:secret@127.0.0.1:9/x"], "postgresql://u:***@127.0.0.1:9/x"),
    (["--storage", "sqlite:///s.db"], "SQLite is not for parallel workers"),
    (["--storage", "mysql://x"], "--storage takes postgresql://"),
    (["--test-split"], "a search never evaluates on the test split"),
    (["--trials", "0"], "--trials must be >= 1"),
])
def test_bad_search_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["search", "--out", str(tmp_path / "s"), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "secret" not in err


@pytest.mark.parametrize("text, message", [
    ('[lrr]\nlow = 0.1\nhigh = 1.0', r"\[lrr\]: unknown setting; a knob is a config field"),
    ('[lr]\nlow = 1.0\nhigh = 0.1', r"\[lr\]: give choices, or low < high"),
    ('[lr]\nlow = -1.0\nhigh = 0.1', r"\[lr\]: lr must be > 0"),
    ('[lr]\nlow = 0.0\nhigh = 0.1\nlog = true', r"\[lr\]: a log scale needs low > 0"),
    ('[lr]\nchoices = [0.1]\nwhen = { optimizer = "sgd" }', r"when: optimizer is not a knob"),
    ('[optimizer]\nchoices = ["sgd"]\n[lr]\nchoices = [0.1]\nwhen = { optimizer = "lamb" }',
     r"when: optimizer never takes 'lamb'"),
    ('[epochs]\nchoices = [1, 2]', r"epochs is not searched: it is set by the search's own"),
    ('[lr]\nchoices = [0.1]\nstep = 2', r"\[lr\]: step go with low and high"),
    ('[lr]\nlow = 0.1\nhigh = 1.0\nbest = 2', r"\[lr\]: unknown key best"),
    ('[width]\nchoices = ["wide"]', r"\[width\]: width must be a whole number"),
])
def test_a_bad_space_file_is_one_line_naming_the_knob(tmp_path, capsys, text, message):
    import re

    path = tmp_path / "space.toml"
    path.write_text(text)
    assert main(["search", "--space", str(path), "--out", str(tmp_path / "s"), *TINY]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith(f"resnet-study: error: {path}: "), err


def test_every_paper_row_but_the_pretrained_one_fits_the_default_space():
    base = get_experiment("resnet18-lr0.01")
    space = load_space(None, base)
    fits = {n: space.params_of(EXPERIMENTS[n], base, {}) for n in GROUPS["paper"]}
    assert [n for n, p in fits.items() if p is None] == ["resnet18-pretrained"]
    assert fits["new-wide-resnet18"] == {**fits["resnet18-adam"], "clipping": True,
                                         "grad_clip": 0.1, "clip_mode": "value", "width": 2,
                                         "shortcut_kernel": 3}
    assert "nesterov" in fits["resnet18-lr0.1"] and "grad_clip" not in fits["resnet18-lr0.1"]


def test_configurations_over_the_budget_are_never_trained(tmp_path, capsys):
    path = tmp_path / "space.toml"
    path.write_text('[width]\nchoices = [2]\n[lr]\nlow = 0.01\nhigh = 0.1')
    out = tmp_path / "s"
    assert main(["search", "--space", str(path), "--out", str(out), "--max-gflop-per-image",
                 "0.5", "--epochs", "1", *TINY]) == 2
    assert "50 configurations in a row cost more than --max-gflop-per-image 0.5" in (
        capsys.readouterr().err)
    assert not list(out.glob("trials/*/checkpoint.pt"))


def _search(out: Path, space: Path, *extra: str) -> list[str]:
    return [EXE, "search", "--space", str(space), "--out", str(out), "--epochs", "2", *TINY,
            *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_killed_search_goes_on_where_it_stood(space, tmp_path):
    """SIGKILL in the middle of a trial (its checkpoint written, its summary not): the rerun
    retries that trial in its folder, from its checkpoint, and loses or repeats nothing."""
    out = tmp_path / "s"
    proc = subprocess.Popen(_search(out, space, "--trials", "4", "--pruner", "none"),
                            env=_env(), start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [
            run for run in out.glob("trials/trial-000[12]")
            if (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()]:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_search(out, space, "--trials", "4", "--pruner", "none"), env=_env(),
                   check=True, capture_output=True)
    rows = check_trials(out, 4, 2)
    dead = [r for r in rows if r["state"] == "FAIL"]
    assert len(dead) == 1 and dead[0]["outcome"] == "dead (its process ended)"
    retry = next(r for r in rows if r["retry_of"] == dead[0]["number"])
    assert retry["run"] == dead[0]["run"] and retry["state"] == "COMPLETE"
    log = (out / retry["run"] / "log.txt").read_text()
    assert "epochs 1-2 of 2" in log and "epochs 2-2 of 2" in log  # resumed after epoch 1


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_workers_together_run_exactly_the_trials_asked_for(space, tmp_path, storage):
    """Two commands at once on one search (one of them with two workers): five trials in all,
    each number once, each in a folder of its own."""
    with postgres_server() if storage == "postgresql" else contextlib.nullcontext() as url:
        extra = ["--storage", url] if url else []
        procs = [subprocess.Popen(_search(tmp_path / "s", space, "--trials", "5", *extra, *w),
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for w in (["--workers", "2"], [])]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
        check_trials(tmp_path / "s", 5, 2)

