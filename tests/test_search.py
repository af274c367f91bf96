"""`resnet-study search` (issue 19, part 3): Optuna's study over a space file, choosing on a
validation split only; what it writes, and what it refuses. Several workers and kills:
`test_search_workers.py`."""

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from resnet_study.catalogue import PRESETS
from resnet_study.cli import main
from resnet_study.search.space import load_space

from .helpers import SEARCH_SPACE, SEARCH_TINY, check_search, journal_trials, search_trials

EXPERIMENTS, GROUPS, get_experiment = PRESETS.experiments, PRESETS.groups(), PRESETS.get

@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.toml"
    path.write_text(SEARCH_SPACE)
    return path


@pytest.fixture(scope="module")
def searched(space, tmp_path_factory):
    """A search through the command line, in this process, with every evaluation recorded,
    and the trials its folder listed when it first wrote its outputs before the end (asked
    to as soon as a trial ended; once, as the figures cost seconds)."""
    import resnet_study.search.run as run
    import resnet_study.training.epoch as epoch

    out = tmp_path_factory.mktemp("search") / "s"
    evaluated, listed = [], []
    evaluate, write_outputs = epoch.evaluate, run.write_outputs

    with pytest.MonkeyPatch.context() as mp:
        def write_and_look(search, study, images):
            summary = write_outputs(search, study, images)
            if not listed:
                listed.append(search_trials(out))
                mp.setattr(run, "OUTPUTS_SECONDS", float("inf"))  # the final write still comes
            return summary

        mp.setattr(epoch, "evaluate", lambda model, loader, amp, **kw: evaluated.append(
            loader.num_images) or evaluate(model, loader, amp, **kw))
        mp.setattr(run, "POLL_SECONDS", 0.05)
        mp.setattr(run, "OUTPUTS_SECONDS", 0.0)
        mp.setattr(run, "write_outputs", write_and_look)
        assert main(["search", "--space", str(space), "--out", str(out), "--trials", "4",
                     "--epochs", "3", "--min-epochs", "1", "--test-subset", "48",
                     "--pruner", "median", *SEARCH_TINY]) == 0  # 3 trials kept: figures
    return out, evaluated, listed[0]


def test_a_search_chooses_on_validation_images_and_never_evaluates_the_test_split(searched):
    out, evaluated, _ = searched
    assert evaluated and set(evaluated) == {32}  # the 32 validation images; the test has 48
    check_search(out, 4, 3)
    for run in out.glob("trials/trial-*/epochs-*"):
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert "val_top1" in header and not [c for c in header if c.startswith("test_")]
        assert json.loads((run / "config.json").read_text())["execution"]["test_split"] is False
        assert json.loads((run / "summary.json").read_text())["test_top1"] is None


def test_a_running_search_lists_its_finished_trials_in_its_folder(searched):
    """While it runs, as trials end, the folder's trials.csv (and page) say what is known."""
    out, _, listed = searched
    finished = [r for r in listed if r["state"] in ("COMPLETE", "PRUNED")]
    assert 1 <= len(finished) < 4
    assert {r["number"] for r in finished} <= {r["number"] for r in search_trials(out)}


def test_each_rung_is_a_complete_schedule_and_the_pruner_sees_only_its_end(searched):
    """Issue 31, part 1: every trial trains a 1-epoch schedule (its one-cycle over 1 epoch) to
    its end, reports that run's validation top-1 at step 1, and only the trials the pruner
    keeps train the 3-epoch schedule, from scratch."""
    out, *_ = searched
    trials = journal_trials(out)
    assert len(trials) == 4 and trials[0].state.name == "COMPLETE"  # the first 3 go on
    for t in trials:
        short, long = (out / t.user_attrs["run"] / f"epochs-00{e}" for e in (1, 3))
        metrics = (short / "metrics.csv").read_text().splitlines()
        assert len(metrics) == 2 and json.loads((short / "summary.json").read_text())[
            "val_top1"] == t.intermediate_values[1]
        assert json.loads((short / "config.json").read_text())["train"]["epochs"] == 1
        assert list(t.intermediate_values) == [1]  # never the 3-epoch run's middle
        assert long.is_dir() == (t.state.name == "COMPLETE")
        if long.is_dir():
            assert (long / "metrics.csv").read_text().count("\n") == 4  # 3 epochs, from 1
            assert json.loads((long / "config.json").read_text())["train"]["epochs"] == 3


def test_the_papers_rows_that_fit_the_space_come_first(searched):
    """Of the paper's rows, the space above expresses the base model (SGD at 0.01) and Adam."""
    out, *_ = searched
    rows = search_trials(out)
    assert [r["paper_row"] for r in rows[:2]] == ["resnet18-lr0.01", "resnet18-adam"]
    assert not any(r["paper_row"] for r in rows[2:])
    assert rows[1]["nesterov"] == "" and rows[1]["optimizer"] == "adam"  # conditional: no nesterov


def test_the_search_writes_its_best_as_an_experiment_and_draws_optunas_figures(searched, capsys):
    out, *_ = searched
    rows = [r for r in search_trials(out) if r["state"] == "COMPLETE"]
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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_the_search_page_renders_in_a_real_browser(searched, tmp_path):
    out, *_ = searched
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000",
                    f"--screenshot={shot}", (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = shot.read_bytes()
    assert pixels[:8] == b"\x89PNG\r\n\x1a\n" and len(pixels) > 50_000  # figures, not blank


def test_a_folder_holding_another_search_is_refused_with_the_difference(searched, space, capsys):
    out, *_ = searched
    same = ["--trials", "4", "--test-subset", "48", "--pruner", "median", *SEARCH_TINY]
    assert main(["search", "--space", str(space), "--out", str(out), "--epochs", "4",
                 "--min-epochs", "1", *same]) == 2
    err = capsys.readouterr().err
    assert "holds another search (recipe.train.epochs: 3, not 4)" in err
    assert main(["search", "--out", str(out), "--epochs", "3", "--min-epochs", "1",
                 *same]) == 2  # the default space, not the file's
    assert "holds another search (space." in capsys.readouterr().err
    assert main(["search", "--space", str(space), "--out", str(out), "--epochs", "3",
                 *same]) == 2  # --min-epochs: 3 by default
    assert "holds another search (min_epochs: 1, not 3)" in capsys.readouterr().err
    assert main(["search", "--space", str(space), "--out", str(out), "--epochs", "3",
                 "--min-epochs", "1", *same, "--device", "cpu",
                 "--precision", "fp32"]) == 0  # execution settings are no difference


def test_its_journal_alone_goes_on_elsewhere_even_from_before_a_setting_existed(
        searched, space, tmp_path, capsys):
    """The journal is a search's whole state: copied alone into a folder of the same name, the
    same command goes on there. A trial that was still in its last rung (its process gone with
    its machine) is retried, its ended rung taken from the journal: only the last rung trains,
    to the same value. Stored by a version before `ema_horizon` existed, the journal is still
    this search; the setting at another value than its default is not."""
    out, *_ = searched
    trials = journal_trials(out)
    died = max((t for t in trials if t.state.name == "COMPLETE"),
               key=lambda t: t.intermediate_values[1])  # one the pruner keeps on any retry
    moved = tmp_path / out.name
    moved.mkdir()
    ops = [json.loads(line) for line in (out / "journal.log").read_text().splitlines()]
    for op in ops:
        if "definition" in op.get("user_attr", {}):
            del op["user_attr"]["definition"]["recipe"]["train"]["ema_horizon"]
    ops = [op for op in ops if not (op.get("trial_id") == died.number and (  # its end unwritten
        op.get("state") == 1 or op.get("user_attr") == {"outcome": "completed"}))]
    (moved / "journal.log").write_text("".join(json.dumps(op) + "\n" for op in ops))
    command = ["search", "--space", str(space), "--out", str(moved), "--trials", "4",
               "--epochs", "3", "--min-epochs", "1", "--test-subset", "48", "--pruner", "median",
               *SEARCH_TINY]
    assert main([*command, "--ema-horizon", "0.5"]) == 2
    assert ("holds another search (recipe.train.ema_horizon: 0.0, not 0.5)"
            in capsys.readouterr().err)
    assert main(command) == 0
    rows = search_trials(moved)
    retry = rows[-1]
    assert rows[died.number]["state"] == "FAIL" and retry["retry_of"] == str(died.number)
    assert retry["state"] == "COMPLETE" and float(retry["value"]) == died.value
    rungs = {p.name for p in (moved / retry["run"]).parent.glob("epochs-*")}
    assert rungs == {"epochs-003"}  # the 1-epoch rung was not trained again
    assert [(r["number"], r["value"]) for r in rows[:-1] if r is not rows[died.number]] == [
        (r["number"], r["value"]) for r in search_trials(out) if r["number"] != str(died.number)]


@pytest.mark.parametrize("args, message", [
    (["--storage", "postgresql://nobody@127.0.0.1:9/none"], "--storage postgresql://nobody@"
                                                           "127.0.0.1:9/none: cannot open it"),
    (["--storage", "postgresql://u:secret@127.0.0.1:9/x"], "postgresql://u:***@127.0.0.1:9/x"),
    (["--storage", "sqlite:///s.db"], "SQLite is not for parallel workers"),
    (["--storage", "mysql://x"], "--storage takes postgresql://"),
    (["--test-split"], "a search never evaluates on the test split"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--min-epochs", "0"], "--min-epochs must be from 1 to the trials' 25 epochs, not 0"),
    (["--epochs", "2", "--min-epochs", "3"], "--min-epochs must be from 1 to the trials' 2"),
])
def test_bad_search_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["search", "--out", str(tmp_path / "s"), *SEARCH_TINY, *args]) == 2
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
    assert main(["search", "--space", str(path), "--out", str(tmp_path / "s"), *SEARCH_TINY]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith(f"resnet-study: error: {path}: "), err


@pytest.mark.parametrize("pruner", ["halving", "median"])
def test_the_pruner_stops_trials_at_a_rungs_end_and_keeps_the_best(pruner):
    """Trials that are the worst by far at the end of the first rung (3 epochs) are stopped
    there; the good ones go on to the 9-epoch rung and are never stopped."""
    import optuna

    from resnet_study.search.trials import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(pruner, 3),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    stopped = {}

    def objective(trial):
        good = trial.number < 4 or trial.number % 4 == 0
        for epochs in (3, 9):
            trial.report((0.9 if good else 0.1) + trial.number / 1000, epochs)
            if trial.should_prune():
                stopped[trial.number] = epochs
                raise optuna.TrialPruned()
        return 0.9 if good else 0.1

    study.optimize(objective, n_trials=16)
    bad = {n for n in range(16) if n >= 4 and n % 4}
    assert set(stopped) <= bad and len(stopped) >= len(bad) - 2, stopped
    assert set(stopped.values()) == {3}


@pytest.mark.parametrize("pruner, min_epochs, epochs, rungs", [
    ("halving", 3, 25, (3, 9, 25)), ("halving", 1, 10, (1, 3, 10)), ("median", 1, 2, (1, 2)),
    ("halving", 3, 3, (3,)), ("none", 3, 25, (25,))])
def test_the_rungs_grow_3x_up_to_the_searched_epochs(pruner, min_epochs, epochs, rungs):
    from resnet_study.search.trials import Search

    search = Search(out=Path("s"), base=get_experiment("resnet18-lr0.01").replace(epochs=epochs),
                    space=None, fixed={}, trials=1, pruner=pruner, min_epochs=min_epochs)
    assert search.rungs == rungs


def test_every_paper_row_but_the_pretrained_one_fits_the_default_space():
    base = get_experiment("resnet18-lr0.01")
    space = load_space(None, base)
    fits = {n: space.params_of(EXPERIMENTS[n], base, {}) for n in GROUPS["paper"]}
    assert [n for n, p in fits.items() if p is None] == ["resnet18-pretrained"]
    assert fits["new-wide-resnet18"] == {**fits["resnet18-adam"], "clipping": True,
                                         "grad_clip": 0.1, "clip_mode": "value", "width": 2,
                                         "shortcut_kernel": 3}
    assert "nesterov" in fits["resnet18-lr0.1"] and "grad_clip" not in fits["resnet18-lr0.1"]


def test_around_an_improved_experiment_it_comes_first_then_the_papers_rows_exactly():
    """Issue 31: around improved-resnet18 no row was queued (its test-time flips and its
    clipping counted as settings that the rows change). The searched experiment comes first,
    then each paper's row that fits, every one the preset it names, to the letter."""
    from resnet_study.config import EXECUTION_FIELDS, RECIPE_SECTIONS, differences
    from resnet_study.search.space import FIDELITY
    from resnet_study.search.trials import Search, paper_rows, trial_experiment

    base = get_experiment("improved-resnet18").replace(val_split=5000, test_split=False)
    search = Search(out=Path("s"), base=base, space=load_space(None, base), fixed={}, trials=48,
                    max_gflop=0.92)
    rows = paper_rows(search, 10)
    assert [n for n, _ in rows] == ["improved-resnet18", *(
        n for n in GROUPS["paper"] if n != "resnet18-pretrained")]
    for name, params in rows:
        unlike = differences(trial_experiment(search, params), get_experiment(name),
                             RECIPE_SECTIONS, ignore=lambda f: f.name in EXECUTION_FIELDS)
        assert [d for d in unlike if d[0] not in FIDELITY | {"tta"}] == [], name


def test_configurations_over_the_budget_are_never_trained(tmp_path, capsys):
    path = tmp_path / "space.toml"
    path.write_text('[width]\nchoices = [2]\n[lr]\nlow = 0.01\nhigh = 0.1')
    out = tmp_path / "s"
    assert main(["search", "--space", str(path), "--out", str(out), "--max-gflop-per-image",
                 "0.5", "--epochs", "1", *SEARCH_TINY]) == 2
    assert "50 configurations in a row cost more than --max-gflop-per-image 0.5" in (
        capsys.readouterr().err)
    assert not list(out.glob("trials/**/checkpoint.pt"))
    # Pruned without a value, not failed: TPE ranks them last, and so learns the budget.
    trials = journal_trials(out)
    assert len(trials) == 50 and {t.state.name for t in trials} == {"PRUNED"}
    assert all(t.user_attrs["outcome"].startswith("over budget: ")
               and not t.intermediate_values for t in trials)


@pytest.mark.parametrize("name", ["resnet18-adam", "improved-resnet18", "mine", "nesterov"])
def test_the_default_space_searches_around_any_experiment(name, tmp_path):
    """Issue 30: a search around an Adam experiment was refused (`nesterov applies to sgd
    only`). Around each experiment, every draw of the default space makes a valid trial: a
    knob whose setting's `when` does not hold keeps the experiment's value, or its default
    where that value needs the `when` (a Nesterov SGD entry's Nesterov under a drawn Adam); one
    that a switch turns off is off (issue 31: `clipping = false` clipped at the experiment's
    2.57 around improved-resnet18)."""
    import optuna

    from resnet_study.search.trials import Search, trial_experiment

    mine = tmp_path / "mine.toml"
    mine.write_text('["mine"]\nextends = "new-wide-resnet18"\n["nesterov".train]\n'
                    "nesterov = true\n")
    base = PRESETS.with_files([mine]).get(name).replace(val_split=5000, test_split=False)
    search = Search(out=tmp_path, base=base, space=load_space(None, base), fixed={}, trials=1)
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    optimizers = set()
    for _ in range(60):
        trial = study.ask()
        drawn = search.space.draw(trial, search.defaults())
        exp = trial_experiment(search, drawn)
        optimizers.add(exp.train.optimizer)
        assert (exp.train.grad_clip > 0) == drawn["clipping"]
        assert (exp.train.mixup > 0) == (drawn["mixing"] in ("mixup", "both"))
        assert exp.train.nesterov in ((False,) if exp.train.optimizer != "sgd"
                                      else (False, True))
        study.tell(trial, 0.0)
    assert optimizers == {"sgd", "adam", "adamw"}
