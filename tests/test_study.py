import json

import pytest
import torch

from resnet_study import Experiment, UsageError
from resnet_study.catalogue import PRESETS
from resnet_study.cli import main
from resnet_study.data.store import load_images
from resnet_study.models import training_flops
from resnet_study.study import (
    MAX_RUNS_PER_GPU,
    Clock,
    auto_runs_per_device,
    parse_shard,
    plan,
    run_study,
    runs_that_fit,
)
from resnet_study.training.callbacks import OnEpoch
from resnet_study.training.run_folder import RunFolder
from resnet_study.training.train import train

from .helpers import presets, read_metrics, without_timings

GROUPS, get_experiment = PRESETS.groups(), PRESETS.get

TINY = dict(data="synthetic", subset=128, batch_size=64, eval_batch_size=200, test_subset=200,
            epochs=1)


def test_plan_covers_every_experiment_and_seed_once_across_shards(tmp_path):
    everything = plan(presets(["resnet18-lr0.1", "resnet18-adam"]), 3, tmp_path, {}, quick=False)
    assert [r.label for r in everything] == [f"{e}/seed-{s}" for e in ("resnet18-lr0.1",
                                                                        "resnet18-adam")
                                             for s in range(3)]
    shards = [plan(presets(["resnet18-lr0.1", "resnet18-adam"]), 3, tmp_path, {}, False, (i, 4))
              for i in range(1, 5)]
    labels = [r.label for shard in shards for r in shard]
    assert sorted(labels) == sorted(r.label for r in everything)
    assert everything[4].out == tmp_path / "resnet18-adam" / "seed-1"
    assert everything[4].experiment.train.seed == 1


def test_a_run_is_the_papers_protocol_until_a_setting_of_its_recipe_changes():
    exp = get_experiment("resnet18-adam")
    assert exp.profile == "paper" and exp.overrides() == {}
    moved = exp.replace(device="cpu", precision="fp32", eval_batch_size=10, compile=True,
                        deterministic=True, data="cifar10")  # how and where, not what
    assert moved.profile == "paper"
    changed = exp.replace(epochs=5, lr=0.05, width=2)
    assert changed.profile == "custom"
    assert changed.overrides() == {"width": 2, "epochs": 5, "lr": 0.05}
    again = Experiment.from_dict(json.loads(json.dumps(changed.to_dict())))
    assert again == changed and again.to_dict()["profile"] == "custom"


def test_quick_profile_is_marked_and_short(tmp_path):
    run = plan(presets(["resnet18-lr0.01"]), 1, tmp_path, {}, quick=True)[0]
    assert run.experiment.profile == "quick"
    assert run.experiment.train.epochs < 25 and run.experiment.data.subset


@pytest.mark.parametrize("text", ["3", "0/2", "3/2", "a/b", "1/2/3"])
def test_malformed_shard_is_refused(text):
    with pytest.raises(UsageError, match="shard"):
        parse_shard(text)


def test_study_completes_then_skips_finished_runs(tmp_path):
    runs = plan(presets(["resnet18-lr0.01", "resnet18-adam"]), 2, tmp_path, TINY, quick=False)
    outcomes = run_study(runs, log=lambda msg: None)
    assert len(outcomes["completed"]) == 4 and not outcomes["failed"]
    stamps = {r.label: (r.out / "summary.json").stat().st_mtime_ns for r in runs}
    again = run_study(runs, log=lambda msg: None)
    assert len(again["skipped"]) == 4
    assert stamps == {r.label: (r.out / "summary.json").stat().st_mtime_ns for r in runs}


def test_interrupted_run_is_resumed_not_counted(tmp_path):
    run = plan(presets(["resnet18-lr0.01"]), 1, tmp_path, {**TINY, "epochs": 2}, quick=False)[0]
    def killed_after_first_epoch(exp, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(run.experiment, run.out, quiet=True, callbacks=[OnEpoch(killed_after_first_epoch)])
    assert run.folder.state() == "partial"
    lines = []
    assert run_study([run], log=lines.append)["completed"] == [run.label]
    assert "1 to go" in lines[0]
    assert json.loads((run.out / "summary.json").read_text())["epochs"] == 2


def test_one_failure_is_recorded_and_the_others_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr("resnet_study.models.pretrained.IMAGENET_WEIGHTS_URL",
                        "http://127.0.0.1:9/resnet18-f37072fd.pth")
    runs = plan(presets(["resnet18-lr0.01", "resnet18-pretrained"]), 1, tmp_path / "s", TINY, False)
    lines = []
    outcomes = run_study(runs, log=lines.append)
    assert outcomes["completed"] == ["resnet18-lr0.01/seed-0"]
    assert outcomes["failed"] == ["resnet18-pretrained/seed-0"]
    summary = json.loads((runs[1].out / "summary.json").read_text())
    assert summary["status"] == "failed" and "could not download ImageNet weights" in summary[
        "error"]
    assert any("resnet18-pretrained/seed-0 failed (UsageError" in line for line in lines)
    assert runs[1].folder.state() == "failed"  # retried by the next invocation


def test_runs_at_once_on_one_device_give_what_each_gives_alone(tmp_path, capsys):
    """Two processes sharing the CPU, against the same runs one after another: bit-identical
    with --deterministic (what several runs on one GPU must keep, there within cuDNN's noise)."""
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 2}.items()]
    for out, extra in (("alone", []), ("together", ["--devices", "cpu", "--runs-per-device",
                                                    "2"])):
        assert main(["study", "resnet18-lr0.01", "--seeds", "2", "--deterministic", "--device",
                     "cpu", "--out", str(tmp_path / out), *settings, *extra]) == 0
        printed, log = capsys.readouterr()
        result = json.loads(printed.splitlines()[-1])
        assert result["completed"] == 2 and result["not_completed"] == []
        assert "in all on this machine" in log  # in parallel, the workers report their epochs
    for seed in (0, 1):
        alone, together = (tmp_path / out / "resnet18-lr0.01" / f"seed-{seed}"
                           for out in ("alone", "together"))
        assert without_timings(read_metrics(alone)) == without_timings(read_metrics(together))
        a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["model"]
                for d in (alone, together))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["study", "--all", "--runs-per-device", "0"]) == 2
    assert "--runs-per-device takes auto or a whole number >= 1, not '0'" in capsys.readouterr().err


def test_auto_runs_per_device_is_one_on_a_cpu_and_what_fits_on_a_gpu(tmp_path):
    runs = plan(presets(["resnet18-lr0.01"]), 1, tmp_path, TINY, quick=False)
    assert auto_runs_per_device("cpu", runs, {"synthetic": load_images("synthetic")})[0] == 1
    gib = 2**30
    assert runs_that_fit(139 * gib, 2 * gib) == MAX_RUNS_PER_GPU == 4
    assert runs_that_fit(10 * gib, 3 * gib) == 2  # 8 GiB of headroom hold two
    assert runs_that_fit(2 * gib, 3 * gib) == 1  # never none: one run may still fit its peak


def test_the_estimate_comes_after_the_first_epoch_and_weighs_each_run(tmp_path):
    runs = plan(presets(["resnet18-lr0.01", "resnet18-wide"]), 1, tmp_path, {**TINY, "epochs": 2},
                quick=False)
    lines = []
    run_study(runs, log=lines.append)
    estimate = next(i for i, line in enumerate(lines) if "in all on this machine" in line)
    assert estimate == 1 and "(resnet18-lr0.01/seed-0 about " in lines[1]
    assert "from its first epoch" in lines[1]
    assert "resnet18-lr0.01/seed-0 completed" in lines[2] and "left" in lines[2]
    assert not any("--quick" in line for line in lines)  # a short study: no advice

    runs = plan(presets(["resnet18-lr0.01", "resnet18-wide"]), 1, tmp_path / "new",
                {**TINY, "epochs": 2}, quick=False)
    clock = Clock(runs, {"synthetic": load_images("synthetic")}, workers=1)
    total = clock.epoch(runs[0], {"epoch_seconds": 10.0})
    wide = training_flops(runs[1].experiment.model, 10) / training_flops(
        runs[0].experiment.model, 10)
    assert 3 < wide < 5  # width 2: about 4x the work per image
    assert total == pytest.approx(10.0 * 2 * (1 + wide))
    assert clock.estimate(runs[1]) == pytest.approx(10.0 * 2 * wide)
    assert clock.epoch(runs[0], {"epoch_seconds": 99.0}) is None  # said once


def test_the_time_left_counts_the_epochs_of_runs_still_going(tmp_path):
    """Two workers, four equal 2-epoch runs: when the first run finishes, the second has
    trained as long. The two left take as long again; counting finished runs alone (as the
    study did) said three times that."""
    runs = plan(presets(["resnet18-lr0.01"]), 4, tmp_path, {**TINY, "epochs": 2}, quick=False)
    clock = Clock(runs, {"synthetic": load_images("synthetic")}, workers=2)
    for run in runs[:2]:
        for _ in range(2):
            clock.epoch(run, {"epoch_seconds": 50.0})
    clock.start -= 100.0  # the two workers' 100 s
    assert clock.finished(runs[0]) == pytest.approx(100.0, rel=0.05)


def test_a_long_study_on_a_cpu_points_to_quick_and_the_gpu(tmp_path, monkeypatch):
    real = Clock.epoch  # as if the one epoch of this one run had taken three days
    monkeypatch.setattr(Clock, "epoch", lambda self, run, row: real(
        self, run, {**row, "epoch_seconds": 3 * 24 * 3600.0}))
    lines = []
    run_study(plan(presets(["resnet18-lr0.01"]), 1, tmp_path, TINY, quick=False), log=lines.append)
    assert any("about 3d00h in all" in line for line in lines)
    assert any("--quick" in line and "GPU" in line for line in lines)


@pytest.mark.parametrize("args, env, message", [
    (["--data", "cifar100"], {"RESNET_STUDY_MIRROR": "http://127.0.0.1:9"}, "cannot download"),
    (["--data", "synthetic", "--device", "cuda"], {}, "CUDA is not available"),
    (["--data", "synthetic", "--devices", "0,1"], {}, "CUDA is not available"),
    (["--data", "synthetic", "--out", "{file}/study"], {}, "cannot write the study to"),
    (["--data", "synthetic", "--subset", "32"], {},
     "resnet18-lr0.1/seed-0: batch_size 256 is larger than the 32 training images"),
])
def test_a_fault_every_run_would_hit_stops_the_study_before_any_run(args, env, message,
                                                                    tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("RESNET_STUDY_DATA", str(tmp_path / "empty-cache"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "study"
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    assert main(["study", "--all", "--out", str(out), *args]) == 2  # a later --out wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resnet-study: error:") and message in err[0]
    assert not list(tmp_path.rglob("seed-*"))


@pytest.mark.parametrize("args, expected", [
    (["--all"], GROUPS["paper"]),
    (["--group", "literature"], GROUPS["literature"]),
    (["--all", "--group", "literature"], GROUPS["paper"] + GROUPS["literature"]),
    (["resnet18-lr0.01", "--group", "literature", "--group", "literature"],
     ["resnet18-lr0.01"] + GROUPS["literature"]),
])
def test_all_means_the_papers_twelve_and_groups_add_to_it(args, expected, monkeypatch, capsys):
    planned = []
    monkeypatch.setattr("resnet_study.study.run_study", lambda runs, *rest: planned.extend(runs)
                        or {"completed": [], "diverged": [], "failed": [], "skipped": []})
    assert main(["study", "--seeds", "1", *args]) == 0
    assert [run.experiment.name for run in planned] == expected
    assert len(GROUPS["paper"]) == 12 and len(GROUPS["literature"]) == 4


@pytest.mark.parametrize("args, message", [
    (["study"], "--all or --group"),
    (["study", "--all", "resnet18-adam"], "not both"),
    (["study", "--all", "--seed", "3"], "--seeds"),
    (["study", "--all", "--seeds", "0"], "--seeds must be"),
    (["study", "--all", "--shard", "5/4"], "shard"),
])
def test_study_bad_input(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_run_that_fails_in_a_study_keeps_all_that_was_known_of_it(tmp_path, monkeypatch):
    """A disk that fills at the first checkpoint: the record keeps the run, not only its error."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("resnet_study.training.checkpoint.torch.save", full_disk)
    run = plan(presets(["resnet18-lr0.01"]), 1, tmp_path, TINY, quick=False)[0]
    assert run_study([run], log=lambda msg: None)["failed"] == [run.label]
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("OSError: [Errno 28] No space left on device")
    assert summary["params"] == 11_181_642 and summary["device"] == "cpu"
    assert summary["precision"] in ("fp32", "bf16") and summary["epochs"] == 1
    assert summary["dataset"] == "synthetic" and summary["settings"].startswith("custom: ")


def test_a_config_json_of_an_earlier_version_still_loads(tmp_path):
    """Before execution settings had a section of their own they were under "train", and
    config.json held no overrides, and the moving average was a per-step decay (`ema`): such a
    file loads, its label computed from the presets, unless it used that average."""
    exp = get_experiment("resnet18-adam").replace(epochs=5, device="cpu", eval_batch_size=10)
    now = exp.to_dict()
    assert now["execution"]["device"] == "cpu" and "device" not in now["train"]
    earlier = {k: v for k, v in now.items() if k not in ("execution", "overrides")}
    earlier["train"] = {**now["train"], **now["execution"], "ema": 0.0}
    del earlier["train"]["ema_horizon"]
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    again = RunFolder(tmp_path).experiment()
    assert again == exp and again.execution.eval_batch_size == 10
    assert again.profile == "custom" and again.overrides() == {"epochs": 5}
    earlier["train"]["ema"] = 0.999  # a decay per step: no share of the run without its steps
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    with pytest.raises(UsageError, match=r"ema = 0.999 is a decay per step.*ema_horizon = 1 / "):
        RunFolder(tmp_path).experiment()


def test_a_rerun_with_another_recipe_is_refused_not_counted_as_done(tmp_path):
    """Issue 19, part 2: the same study with --lr 0.5 over runs trained at 0.01 printed
    "1 already finished" and exited 0."""
    tiny = {"data": "synthetic", "subset": 64, "test_subset": 32, "batch_size": 32, "epochs": 1,
            "device": "cpu"}
    assert run_study(plan(presets(["resnet18-lr0.01"]), 1, tmp_path, tiny, quick=False),
                     log=lambda m: None)["completed"]
    with pytest.raises(UsageError, match=r"resnet18-lr0.01/seed-0 was trained with lr=0.01, "
                                         r"not 0.5; choose another --out"):
        run_study(plan(presets(["resnet18-lr0.01"]), 1, tmp_path, {**tiny, "lr": 0.5}, quick=False))
    again = run_study(plan(presets(["resnet18-lr0.01"]), 1, tmp_path, {**tiny, "precision": "fp32"},
                           quick=False), log=lambda m: None)  # execution: not a difference
    assert again["skipped"] == ["resnet18-lr0.01/seed-0"]
