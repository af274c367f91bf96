"""`--log mlflow` (issue 32, part 2): runs of a study, a search's trials and a single run, read
back from a real MLflow store (SQLite, no server) with MLflow's own client; a store that fails
mid-run costs the run nothing."""

import json
import sys

import pytest

from resnet_study.catalogue import PRESETS
from resnet_study.cli import main
from resnet_study.training.callbacks import OnEpoch
from resnet_study.training.train import train

from .helpers import SEARCH_SPACE, SEARCH_TINY

pytest.importorskip("mlflow", reason="MLflow is an optional extra; `make test` installs it")
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = ["--data", "synthetic", "--subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--epochs", "2", "--device", "cpu"]


def client(folder):
    return MlflowClient(tracking_uri=f"sqlite:///{folder.resolve() / 'mlflow.db'}")


def runs_of(folder, experiment: str) -> dict:
    mlflow = client(folder)
    found = mlflow.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in mlflow.search_runs([found.experiment_id])}


def test_a_studys_runs_are_mlflow_runs_with_recipe_metrics_status_and_files(tmp_path):
    out = tmp_path / "my-study"
    assert main(["study", "resnet18-lr0.01", "resnet18-adam", "--seeds", "1", "--out", str(out),
                 "--log", "mlflow", *TINY]) == 0
    runs = runs_of(out, "my-study")
    assert set(runs) == {"resnet18-lr0.01/seed-0", "resnet18-adam/seed-0"}
    mlflow = client(out)
    for name, run in runs.items():
        folder = out / name
        params = run.data.params
        assert params["train.optimizer"] == ("adam" if "adam" in name else "sgd")
        assert params["train.epochs"] == "2" and params["data.subset"] == "64"
        assert run.data.tags["resnet_study.settings"].startswith("custom: ")
        assert run.info.status == "FINISHED"
        history = mlflow.get_metric_history(run.info.run_id, "test_top1")
        assert [m.step for m in history] == [1, 2]
        assert history[-1].value == pytest.approx(
            json.loads((folder / "summary.json").read_text())["test_top1"])
        assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} == {"config.json",
                                                                           "summary.json"}


def test_a_searchs_trials_are_runs_tagged_with_their_trial_and_outcome(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SEARCH_SPACE)
    out = tmp_path / "s"
    assert main(["search", "--space", str(space), "--out", str(out), "--trials", "3",
                 "--epochs", "1", "--pruner", "none", "--log", "mlflow", *SEARCH_TINY]) == 0
    runs = runs_of(out, "s")
    assert sorted(runs) == [f"trial-000{n}/epochs-001" for n in range(3)]
    for name, run in runs.items():
        assert run.data.tags["trial"] == name[9] and run.data.tags["rung_epochs"] == "1"
        assert run.data.tags["resnet_study.outcome"] == "completed"
        assert run.info.status == "FINISHED" and "val_top1" in run.data.metrics


def test_a_resumed_run_goes_on_in_its_mlflow_run(tmp_path):
    exp = PRESETS.get("resnet18-lr0.01").replace(data="synthetic", subset=64, batch_size=32,
                                                 test_subset=32, epochs=2, log=("mlflow",))

    def crash_after_first_epoch(exp, row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(exp, tmp_path / "run", quiet=True, callbacks=[OnEpoch(crash_after_first_epoch)])
    (killed,) = runs_of(tmp_path / "run", "resnet18-lr0.01").values()
    assert killed.info.status == "KILLED"
    train(exp, tmp_path / "run", resume=True, quiet=True)
    (run,) = runs_of(tmp_path / "run", "resnet18-lr0.01").values()
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client(tmp_path / "run").get_metric_history(run.info.run_id,
                                                                         "train_loss")]
    assert steps == [1, 2]


def test_a_store_that_fails_mid_run_costs_the_run_nothing(tmp_path, capsys):
    """The store is made unreadable after the first epoch: one warning line, and the run
    trains to its end with every file of its folder."""
    exp = PRESETS.get("resnet18-lr0.01").replace(data="synthetic", subset=64, batch_size=32,
                                                 test_subset=32, epochs=2, log=("mlflow",))
    out = tmp_path / "run"

    def break_the_store(exp, row):
        (out / "mlflow.db").write_bytes(b"not a database" * 100)

    summary = train(exp, out, quiet=True, callbacks=[OnEpoch(break_the_store)])
    assert summary["status"] == "completed" and summary["epochs"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "mlflow stopped tracking this run" in warnings[0]
    assert "the run's folder is its record" in warnings[0]
    assert (out / "metrics.csv").read_text().count("\n") == 3


def test_without_mlflow_log_mlflow_is_one_line_saying_how_to_install_it(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as where it is not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    assert main(["train", "resnet18-lr0.01", "--out", str(tmp_path / "run"), "--log", "mlflow",
                 *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'resnet-study[mlflow]'" in err[0]
    assert not (tmp_path / "run").exists()
