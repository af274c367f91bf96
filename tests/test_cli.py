import json
import re
import subprocess
import sys

import pytest

from resnet_study.cli import main

from .helpers import LITERATURE_PARAMS, PAPER_PARAMS


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "resnet_study", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_experiments_json_lists_every_row_with_paper_counts(capsys):
    assert main(["experiments", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["params"] for r in rows if r["group"] == "paper"} == PAPER_PARAMS
    literature = {r["name"]: r for r in rows if r["group"] == "literature"}
    assert {name: r["params"] for name, r in literature.items()} == {
        name: LITERATURE_PARAMS[name.removesuffix("-paper-recipe")][0] for name in literature}
    assert literature["wrn-16-8"]["model"] == "WRN-16-8"
    assert literature["wrn-16-8"]["schedule"] == "x0.2 at 60,120,160"
    assert literature["resnet-110"]["schedule"] == "x0.1 at 82,123, 0.1x for 400 steps"
    assert literature["resnet-110-paper-recipe"]["schedule"] == "one-cycle"


def test_experiments_table_is_readable(capsys):
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert "50,266,276" in out and "new-wide-resnet18" in out and "adam" in out


@pytest.mark.parametrize("args, message", [
    (["train", "resnet19"], "unknown experiment"),
    (["train", "resnet18-lr0.01", "--lr", "-1"], "lr must be > 0"),
    (["train", "resnet18-lr0.01", "--epochs", "0"], "epochs must be > 0"),
    (["train", "resnet18-lr0.01", "--batch-size", "0"], "batch_size must be > 0"),
    (["train", "resnet18-lr0.01", "--block", "sideways"], "invalid choice"),
    (["train", "resnet18-lr0.01", "--channels", "4"], "channels must be a whole number >= 8"),
    (["train", "resnet18-lr0.01", "--onecycle-warmup", "1.5"],
     "onecycle_warmup must be in (0, 1), not 1.5"),
    (["train", "resnet18-lr0.01", "--stem", "cifar-s2", "--pretrained", "imagenet"],
     "pretrained weights exist only for the base architecture"),
    (["train", "resnet18-lr0.01", "--data", "/no/such/data"], "does not exist"),
    (["train", "resnet18-lr0.01", "--data", "synthetic", "--batch-size", "99999"],
     "larger than"),
    (["train", "resnet18-lr0.01", "--device", "cuda:3"], "CUDA is not available"),
    (["train", "resnet18-lr0.01", "--milestones", "60,x"],
     "invalid comma-separated int list value: '60,x'"),
    (["train", "resnet18-lr0.01", "--milestones", "60"], "milestones and warmup_steps belong to "
     "schedule = multistep"),
    (["train", "resnet18-lr0.01", "--schedule", "multistep", "--milestones", "2,1"],
     "milestones must be increasing epochs >= 1, not [2, 1]"),
    (["study", "--group", "nosuch"], "unknown group 'nosuch'; choose one of: paper, literature"),
    (["evaluate", "/no/such/run"], "not a run directory"),
])
def test_bad_input_is_one_line_on_stderr(args, message, tmp_path, capsys):
    """In this process (a process each cost the suite half a minute): `main` is the command,
    and argparse's own refusals exit through it."""
    try:
        code = main([*args, "--out", str(tmp_path / "run")] if args[0] == "train" else args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.precision
def test_train_then_evaluate_reproduces_the_final_accuracy(tmp_path, auto_precision):
    """Exact to printing in either precision: the same model, batches and kernels."""
    run = tmp_path / "run"
    result = run_cli("train", "resnet18-lr0.01", "--data", "synthetic", "--subset", "256",
                     "--batch-size", "128", "--epochs", "1", "--out", str(run), "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert "epoch   1/1" in result.stderr
    evaluated = run_cli("evaluate", str(run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test_top1"] == pytest.approx(summary["test_top1"],
                                                                      abs=1e-6)
    assert json.loads((run / "summary.json").read_text())["precision"] == auto_precision


def test_divergence_exits_with_its_own_status(tmp_path):
    result = run_cli("train", "resnet18-no-bn", "--data", "synthetic", "--subset", "256",
                     "--batch-size", "128", "--epochs", "1", "--lr", "1e6", "--quiet",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 3
    assert "diverged" in result.stderr
    assert json.loads(result.stdout)["status"] == "diverged"


def test_bench_reports_three_rates_their_ratios_and_peak_memory(capsys):
    assert main(["bench", "--batch-size", "16", "--batches", "1", "--windows", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compute"] > 0 and result["project"] > 0 and result["reference"] > 0
    assert result["project_over_compute"] == pytest.approx(result["project"] / result["compute"])
    assert result["project_over_reference"] == pytest.approx(
        result["project"] / result["reference"])
    assert result["peak_memory_mib"] > 50  # the model, its gradients and the data at least
    assert 0.2 < result["gflop_per_image"] < 0.24  # 10 classes; 0.218 with the paper's 100
    assert result["project_tflops"] == pytest.approx(result["project"] * result[
        "gflop_per_image"] / 1e3)
    assert result["peak_tflops"] is None and result["project_fraction_of_peak"] is None  # CPU


def test_bench_without_reference_prints_a_table(capsys):
    assert main(["bench", "--batch-size", "16", "--batches", "1", "--windows", "1",
                 "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "project / compute" in out and "reference" not in out
    assert "model TFLOP/s" in out and "device peak not known" in out


def test_version_names_the_package_and_its_commit_and_help_the_documentation(capsys):
    """Issue 33: as every CLI of its kind; the commit from this git checkout."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    out = capsys.readouterr().out.strip()
    assert done.value.code == 0
    assert re.fullmatch(r"resnet-study \d+\.\d+\.\d+ \(commit [0-9a-f]{12}(\+dirty)?\)", out), out
    with pytest.raises(SystemExit):
        main(["--help"])
    words = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal's width
    assert words.endswith("The documentation: README.md and docs/ at the top of the project's "
                          "source tree.")
