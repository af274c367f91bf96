"""The user's own experiments (issue 19, part 1): files in the presets' format, validated as the
presets are, whose runs carry their whole recipe so that a report needs no file."""

import csv
import html
import json
import re
from pathlib import Path

import pytest

from resnet_study.cli import main

# Small enough to train in seconds; set in the entries, so that their runs are as they define.
SMALL = """
["{name}".data]
subset = 64
test_subset = 32
["{name}".train]
epochs = 1
batch_size = 32
"""
HOSTILE_ROW = r"$\frac{a}$ <script>alert(1)</script> \input{/etc/passwd} & # | *x*"
FILE = f"""
["small-base"]
row = "Base, small"
{SMALL.format(name="small-base")}
["small-lr0.05"]
extends = "small-base"
row = '{HOSTILE_ROW}'
notes = "LR between the paper's 0.1 and 0.01."
group = "mine"
["small-lr0.05".train]
lr = 0.05

["adam-smooth"]
extends = "resnet18-adam"
["adam-smooth".train]
label_smoothing = 0.1
"""


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def listed(capsys, *files: Path) -> dict[str, dict]:
    assert main(["experiments", "--json", *(a for f in files for a in ("--experiments", str(f)))
                 ]) == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)}


def test_an_entry_inherits_its_parents_recipe_and_overrides_it(tmp_path, capsys):
    rows = listed(capsys, write(tmp_path, FILE))
    assert list(rows)[-3:] == ["small-base", "small-lr0.05", "adam-smooth"]  # after the presets
    mine = rows["small-lr0.05"]
    assert (mine["lr"], mine["epochs"], mine["batch_size"], mine["optimizer"]) == (
        0.05, 1, 32, "sgd")  # its own, its parent's (an entry itself), its grandparent's
    assert mine["group"] == "mine" and mine["extends"] == "small-base"
    assert rows["small-base"]["group"] == "own" and rows["small-base"]["extends"] == (
        "resnet18-lr0.01")  # the base model unless it says otherwise
    assert rows["adam-smooth"]["optimizer"] == "adam" and rows["adam-smooth"]["epochs"] == 25
    assert "small-base" not in listed(capsys)  # the next command without the file knows none


@pytest.mark.parametrize("text, message", [
    ('["resnet18-adam"]\nrow = "x"', r"\[resnet18-adam\]: 'resnet18-adam' is a built-in "
                                     "experiment; choose another name"),
    ('["x"]\nlr = 0.1', r"\[x\]: lr: unknown key here: lr belongs in \[x.train\]"),
    ('["x"]\ncolour = "red"', r"\[x\]: colour: unknown key; an entry takes extends, row"),
    ('["x".train]\nlrr = 0.1', r"\[x\]: train.lrr: unknown key"),
    ('["x".train]\ndevice = "cuda"', r"\[x\]: train.device: not part of an experiment"),
    ('["x"]\nextends = "nope"', r"\[x\]: extends: unknown experiment 'nope'"),
    ('["x"]\nextends = "y"\n["y"]\nextends = "x"', r"\[y\]: extends: 'x' extends it in turn "
                                                  r"\(x -> y -> x\)"),
    ('["x"]\nextends = "x"', r"\[x\]: extends: 'x' extends it in turn"),
    ('["x".train]\nlr = -1', r"\[x\] train: lr must be > 0, not -1.0"),
    ('["x".train]\nlr = "fast"', r"\[x\] train: lr must be a number, not 'fast'"),
    ('["x".train]\nnesterov = 1', r"\[x\] train: nesterov must be true or false, not 1"),
    ('["x".train]\nlr = inf', r"\[x\] train: lr must be a finite number"),
    ('["x".model]\nwidth = 0', r"\[x\] model: width must be a whole number >= 1"),
    ('["x"]\ngroup = "paper"', r"\[x\]: group: the group paper is the paper's twelve"),
    ('x = 3', r"\[x\]: an entry is a table of settings"),
    ('["x"]\nrow = 3', r"\[x\]: row must be a string"),
    ('["x"\nrow = 3', r"not valid TOML \(.*line 1"),
    # Names are folders of every study: no path, no traversal, nothing a shell reads twice.
    ('["../evil"]\nrow = "x"', r"\[\.\./evil\]: an experiment's name is a folder name"),
    ('["/etc/x"]\nrow = "x"', r"\[/etc/x\]: an experiment's name is a folder name"),
    ('["a/b"]\nrow = "x"', r"\[a/b\]: an experiment's name is a folder name"),
    ('[".hidden"]\nrow = "x"', r"\[\.hidden\]: an experiment's name is a folder name"),
    ('["$(rm -rf ~)"]\nrow = "x"', r"an experiment's name is a folder name"),
    ('["<script>"]\nrow = "x"', r"an experiment's name is a folder name"),
])
def test_a_faulty_entry_is_one_line_naming_the_file_the_entry_and_the_key(tmp_path, capsys,
                                                                           text, message):
    path = write(tmp_path, text)
    assert main(["study", "--experiments", str(path), "--all", "--out", str(tmp_path / "s")]
                ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"resnet-study: error: {path}")
    assert re.search(message, err), err
    assert not (tmp_path / "s").exists()


def test_files_are_one_set_of_entries_and_a_name_is_defined_once(tmp_path, capsys):
    first = write(tmp_path, '["x"]\nrow = "one"', "a.toml")
    second = write(tmp_path, '["y"]\nextends = "x"\n["y".train]\nlr = 0.2', "b.toml")
    assert listed(capsys, second, first)["y"]["lr"] == 0.2  # a parent in another, later file
    again = write(tmp_path, '["x"]\nrow = "two"', "c.toml")
    assert main(["train", "x", "--experiments", str(first), "--experiments", str(again)]) == 2
    assert f"{again}: [x]: 'x' is defined twice (first in {first})" in capsys.readouterr().err
    assert main(["train", "x", "--experiments", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: no such experiments file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The entries of FILE and the base model at the entries' size, in one study; then the
    file is gone, as it is when a study folder is copied to another machine."""
    tmp = tmp_path_factory.mktemp("own")
    path = write(tmp, FILE)
    out = tmp / "study"
    args = ["--experiments", str(path), "--seeds", "2", "--out", str(out), "--data",
            "synthetic", "--device", "cpu"]
    assert main(["study", "small-base", "--group", "mine", *args]) == 0
    assert main(["study", "resnet18-lr0.01", "--subset", "64", "--test-subset", "32",
                 "--epochs", "1", "--batch-size", "32", "--seeds", "2", "--out", str(out),
                 "--data", "synthetic", "--device", "cpu"]) == 0
    path.unlink()
    return out


def test_a_report_needs_no_file_and_puts_the_users_rows_after_the_papers(study, capsys):
    config = json.loads((study / "small-lr0.05" / "seed-1" / "config.json").read_text())
    assert config["extends"] == "small-base" and config["train"]["lr"] == 0.05
    assert config["profile"] == "paper" and config["overrides"] == {}  # run as defined
    assert main(["report", str(study), "--no-inspect"]) == 0
    with open(study / "report" / "table1.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["n"]]
    assert [r["experiment"] for r in rows] == ["resnet18-lr0.01", "small-base", "small-lr0.05"]
    assert rows[2]["row"] == HOSTILE_ROW and rows[2]["settings"] == "paper"
    assert rows[0]["settings"].startswith("custom: ")
    md = (study / "report" / "table1.md").read_text()
    assert "| own, extends small-base |" in md and "<script>" not in md
    page = (study / "report" / "index.html").read_text()
    assert html.escape(HOSTILE_ROW) in page and "<script>alert" not in page
    assert r"\input{" not in (study / "report" / "table1.tex").read_text()


def test_report_base_compares_every_row_with_the_named_experiment(study, capsys):
    assert main(["report", str(study), "--no-inspect", "--base", "small-base"]) == 0
    with open(study / "report" / "statistics.csv", newline="") as f:
        stats = list(csv.DictReader(f))
    assert {r["experiment"] for r in stats} == {"resnet18-lr0.01", "small-lr0.05"}
    assert {r["against"] for r in stats} == {"small-base"} and all(r["p_value"] for r in stats)
    assert all(" points against small-base (95% CI" in r["sentence"] for r in stats)
    assert "<h2>Against small-base</h2>" in (study / "report" / "index.html").read_text()
    capsys.readouterr()
    assert main(["report", str(study), "--no-inspect", "--base", "nope"]) == 2
    assert "--base nope: no completed run of it in" in capsys.readouterr().err


def test_an_edited_entry_is_refused_over_its_earlier_runs(study, tmp_path, capsys):
    """Issue 19, part 2, for the user's own rows: the entry changed, its runs did not."""
    path = write(tmp_path, FILE.replace("lr = 0.05", "lr = 0.07"))
    assert main(["study", "small-lr0.05", "--experiments", str(path), "--seeds", "2", "--out",
                 str(study), "--data", "synthetic", "--device", "cpu"]) == 2
    assert ("small-lr0.05/seed-0 was trained with lr=0.05, not 0.07; choose another --out"
            in capsys.readouterr().err)
