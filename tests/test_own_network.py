"""A network of the user's own (issue 32, part 1): the shipped example (`examples/`) through
`experiments`, `study`, `inspect`, `report` and a search with two workers, as a user runs it:
from the folder that holds its module."""

import html
import json
import shutil
import sys
from pathlib import Path

import pytest

from resnet_study.cli import main

from .helpers import SEARCH_TINY, search_trials

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--data", "synthetic", "--subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--epochs", "2", "--device", "cpu"]
SE_PARAMS = 11_316_892  # the base model's 11,227,812 and 89,080 in the gates (docs/experiments.md)


@pytest.fixture
def example(tmp_path, monkeypatch) -> Path:
    """A copy of examples/ as the working directory (Python caches the module's bytecode
    beside it)."""
    folder = tmp_path / "examples"
    shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(folder)
    return folder


def test_the_example_is_listed_with_its_parameters_and_cost(example, capsys):
    assert main(["experiments", "--json", "--experiments", "se.toml"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "resnet18-se")
    assert row["params"] == SE_PARAMS and 0.2 < row["gflop"] < 0.25
    assert row["model"] == "my_nets:resnet18_se reduction=16"


def test_a_study_of_the_example_is_reported_and_inspected(example, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "study"
    assert main(["study", "resnet18-se", "resnet18-lr0.01", "--experiments", "se.toml",
                 "--seeds", "2", "--out", str(out), *TINY]) == 0
    config = json.loads((out / "resnet18-se/seed-0/config.json").read_text())
    assert config["model"]["family"] == "my_nets:resnet18_se"
    assert config["model"]["options"] == {"reduction": 16}
    assert main(["inspect", str(out / "resnet18-se/seed-0"), "--images", "32"]) == 0
    inspected = json.loads((out / "resnet18-se/seed-0/inspect/summary.json").read_text())
    assert inspected["cam_layer"] == "5.1.conv2"  # layer2's last conv: 4x4, found by running
    assert "not measured" in inspected["not_done"][0]
    for stage in ("stem", "4", "5", "6", "7"):
        assert (out / f"resnet18-se/seed-0/inspect/feature_maps_{stage}.png").is_file()
    monkeypatch.chdir(tmp_path)  # the report imports no user code: my_nets is not here
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = (out / "report" / "table1.md").read_text()
    ten_classes = SE_PARAMS - 90 * 513  # synthetic data's 10: fc 512 x 10 + 10
    assert f"| ResNet-18 + SE blocks | {ten_classes:,} |" in table
    report = html.unescape((out / "report" / "index.html").read_text())
    assert "resnet18-se/seed-1 not inspected: a network of your own" in report
    assert "resnet18-se (n = 1): output variance" in report

    run = str(out / "resnet18-se/seed-1")  # its code changed, then gone: one line each
    monkeypatch.chdir(example)
    module = example / "my_nets.py"
    module.write_text(module.read_text().replace("channels // reduction",
                                                  "channels // (2 * reduction)"))
    monkeypatch.delitem(sys.modules, "my_nets")
    capsys.readouterr()
    assert main(["evaluate", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "your network my_nets:resnet18_se is not the one this run was " \
                               "trained with" in err[0]
    module.unlink()
    monkeypatch.delitem(sys.modules, "my_nets")
    assert main(["evaluate", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no module my_nets here" in err[0]


def test_a_search_around_the_example_leaves_out_the_model_knobs(example, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", "resnet18-se", "--experiments", "se.toml", "--out", str(out),
                 "--trials", "2", "--workers", "2", "--epochs", "1", "--pruner", "none",
                 *SEARCH_TINY]) == 0
    err = capsys.readouterr().err
    assert "the model knobs" in err and "stem, " in err and "are left out of this search" in err
    rows = search_trials(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    config = json.loads((out / rows[0]["run"] / "config.json").read_text())
    assert config["model"]["family"] == "my_nets:resnet18_se"
