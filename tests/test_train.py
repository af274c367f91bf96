import json
import subprocess

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from resnet_study import UsageError
from resnet_study.catalogue import PRESETS
from resnet_study.cli import main
from resnet_study.training import assembly
from resnet_study.training import train as trainlib
from resnet_study.training.callbacks import OnEpoch, Stop
from resnet_study.training.checkpoint import load_run
from resnet_study.training.epoch import evaluate
from resnet_study.training.run_folder import GIT_COMMIT, git_commit
from resnet_study.training.train import train

from .helpers import read_metrics, without_timings

get_experiment = PRESETS.get

# Small but real: the paper's network on 256 synthetic images, four steps per epoch.
FAST = dict(data="synthetic", subset=256, batch_size=64, eval_batch_size=500, epochs=2)


def fast(name="resnet18-lr0.01", **overrides):
    return get_experiment(name).replace(**{**FAST, **overrides})


def test_run_directory_has_metrics_config_summary_and_checkpoint(tmp_path):
    summary = train(fast(), tmp_path, quiet=True)
    assert summary["status"] == "completed"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in ("experiment", "status", "params", "epochs", "test_top1", "test_top5",
                "train_seconds", "images_per_second", "device", "torch", "git_commit"):
        assert key in summary
    assert summary["params"] == 11_181_642  # the base model with 10 classes
    assert summary["epochs"] == 2
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == trainlib.METRICS
    assert float(rows[-1]["test_top1"]) == pytest.approx(summary["test_top1"])
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "resnet18-lr0.01"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert summary["git_commit"] == GIT_COMMIT  # the code's, as it was imported


def test_the_commit_recorded_says_whether_the_tree_was_dirty(tmp_path):
    """Issue 30: a run's git_commit named the commit alone, though the code differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True, check=True
                              ).stdout.strip()

    assert git_commit(tmp_path) == "unknown"
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    sha = git("rev-parse", "--short=12", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked: not the code\n")
    assert git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{sha}+dirty"


def test_lr_follows_one_cycle_stepped_every_batch(tmp_path):
    exp = fast(lr=0.05, epochs=3)
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        train(exp, tmp_path, quiet=True)
    finally:
        hook.remove()
    steps = 3 * (256 // 64)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.05, total_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert seen == pytest.approx(expected, rel=1e-12)
    assert max(seen) <= 0.05 and seen.index(max(seen)) < 0.4 * steps


def test_learns_the_synthetic_task(tmp_path):
    summary = train(fast(subset=1024, epochs=2, lr=0.02), tmp_path, quiet=True)
    assert summary["test_top1"] > 0.45  # measured 0.66; 10 classes: chance is 0.1


def test_the_moving_average_is_what_is_evaluated_and_kept_beside_the_weights(tmp_path):
    """With --ema-horizon the epoch's test figures are the average's, the checkpoint keeps both, and
    `evaluate`'s and `inspect`'s loader (`load_run`) takes the average."""
    summary = train(fast(epochs=1, ema_horizon=0.5), tmp_path, quiet=True)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    run = load_run(tmp_path, progress=False)
    loaded = run.model.state_dict()
    assert loaded.keys() == trained.keys()
    assert any(not torch.equal(loaded[k].cpu(), trained[k]) for k in trained)
    assert evaluate(run.model, run.splits.test, run.amp)["top1"] == summary["test_top1"]


def test_the_moving_average_reaches_back_the_same_share_of_a_short_and_a_long_run():
    """Issue 31: a share of the run, not a decay per step, so a trial's horizon is the
    protocol's; a horizon under one step is the last weights alone."""
    assert assembly.ema_decay(0.1, 1_000) == pytest.approx(0.99)
    assert assembly.ema_decay(0.1, 10_000) == pytest.approx(0.999)
    assert assembly.ema_decay(0.01, 50) == 0.0


def test_flips_at_test_time_are_a_column_beside_the_single_view(tmp_path, capsys):
    """test_top1_tta in metrics.csv and the summary; the protocol's test_top1 and the training
    are those of the same run without it."""
    plain = train(fast(epochs=1), tmp_path / "plain", quiet=True)
    flips = train(fast(epochs=1, tta=True), tmp_path / "flips", quiet=True)
    rows = read_metrics(tmp_path / "flips")
    assert "test_top1_tta" not in plain and "test_top1_tta" not in read_metrics(
        tmp_path / "plain")[0]
    assert flips["test_top1_tta"] == float(rows[-1]["test_top1_tta"])
    assert 0 <= flips["test_top1_tta"] <= 1
    assert flips["test_top1"] == plain["test_top1"]
    assert main(["evaluate", str(tmp_path / "flips"), "--json"]) == 0  # the same, re-tested
    assert json.loads(capsys.readouterr().out)["test_top1_tta"] == flips["test_top1_tta"]


@pytest.mark.slow
@pytest.mark.precision
def test_resume_after_a_crash_is_bit_identical(tmp_path, auto_precision):
    """Exact in either precision: a resumed run redoes what the uninterrupted one did, with
    every option that draws or keeps state of its own on (dropout, mixup and CutMix, the
    weights' moving average, decay on weights only, flips at test time), on a 16x16 stem of
    32 channels, with a short one-cycle warm-up and biases at 4x the LR."""
    exp = fast(epochs=3, deterministic=True, block_dropout=0.1, fc_dropout=0.2, mixup=0.4,
               cutmix=1.0, ema_horizon=0.5, decay_norms_and_biases=False, tta=True, channels=32,
               stem="cifar-s2", onecycle_warmup=0.1, bias_lr_scale=4.0)
    full = train(exp, tmp_path / "full", quiet=True)

    def crash_after_second_epoch(exp, row):  # its checkpoint written, the third not begun
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(exp, tmp_path / "cut", quiet=True, callbacks=[OnEpoch(crash_after_second_epoch)])
    assert len(read_metrics(tmp_path / "cut")) == 2
    resumed = train(exp, tmp_path / "cut", resume=True, quiet=True)

    assert without_timings(read_metrics(tmp_path / "cut")) == without_timings(
        read_metrics(tmp_path / "full"))
    assert resumed["test_top1"] == full["test_top1"]
    assert resumed["test_top1_tta"] == full["test_top1_tta"]
    assert [bool(r["test_top1_tta"]) for r in read_metrics(tmp_path / "full")] == [
        False, False, True]  # flips are tested after the last epoch alone
    assert resumed["precision"] == full["precision"] == auto_precision
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    train(fast(epochs=1), tmp_path, quiet=True)
    before = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(UsageError, match="--resume"):
        train(fast(epochs=1), tmp_path, quiet=True)
    assert (tmp_path / "metrics.csv").read_text() == before


def test_resume_refuses_another_experiment(tmp_path):
    train(fast(epochs=1), tmp_path, quiet=True)
    with pytest.raises(UsageError, match="optimizer"):
        train(fast("resnet18-adam", epochs=1), tmp_path, resume=True, quiet=True)


def test_resuming_a_finished_run_keeps_it_as_it_was(tmp_path, capsys):
    first = train(fast(epochs=1), tmp_path, quiet=True)
    files = {name: (tmp_path / name).read_bytes()
             for name in ("summary.json", "metrics.csv", "checkpoint.pt")}
    again = train(fast(epochs=1), tmp_path, resume=True, quiet=True)
    assert again == first
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert "already trained to epoch 1 of 1; nothing to resume" in capsys.readouterr().err

    # Killed after its last checkpoint but before its summary: resuming writes the summary.
    (tmp_path / "summary.json").unlink()
    written = train(fast(epochs=1), tmp_path, resume=True, quiet=True)
    assert written["status"] == "completed" and written["test_top1"] == first["test_top1"]
    assert json.loads((tmp_path / "summary.json").read_text()) == written


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        train(fast(), tmp_path, resume=True, quiet=True)


def test_non_finite_loss_is_recorded_as_diverged(tmp_path):
    summary = train(fast("resnet18-no-bn", lr=1e6, epochs=2), tmp_path, quiet=True)
    assert summary["status"] == "diverged"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_validation_split_adds_columns_and_shrinks_training_set(tmp_path, monkeypatch):
    exp = fast(epochs=1, val_split=1000)
    seen = []
    real = assembly.make_splits

    def spy(*args, **kwargs):
        splits = real(*args, **kwargs)
        seen.append((splits.train.num_images, splits.val.num_images))
        return splits

    monkeypatch.setattr(assembly, "make_splits", spy)
    train(exp, tmp_path, quiet=True)
    assert seen == [(256, 1000)]
    row = read_metrics(tmp_path)[0]
    assert 0 <= float(row["val_top1"]) <= 1 and float(row["val_loss"]) > 0


def test_adam_with_norm_clipping_and_fp32_runs(tmp_path):
    exp = fast("resnet18-adam-clip", epochs=1, clip_mode="norm", grad_clip=1.0, precision="fp32")
    assert train(exp, tmp_path, quiet=True)["status"] == "completed"


def test_batch_larger_than_dataset_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="larger than"):
        train(fast(batch_size=1024), tmp_path, quiet=True)
    assert not (tmp_path / "config.json").exists()


def test_tensorboard_gets_every_metric_per_epoch(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(fast(), tmp_path, quiet=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = read_metrics(tmp_path)
    assert set(events.Tags()["scalars"]) == set(trainlib.METRICS)
    top1 = [e.value for e in events.Scalars("test_top1")]
    assert top1 == pytest.approx([float(r["test_top1"]) for r in rows])


def test_cuda_graphs_on_a_cpu_train_eager_and_say_so_once(tmp_path, capsys):
    exp = fast(epochs=1, deterministic=True)
    train(exp, tmp_path / "eager", quiet=True)
    capsys.readouterr()
    asked = train(exp.replace(cuda_graphs=True), tmp_path / "asked", quiet=True)
    err = capsys.readouterr().err
    assert err.count("CUDA graphs off: they need a CUDA device; training eager") == 1
    assert asked["cuda_graph"] is False and asked["capture_seconds"] == 0.0
    assert asked["profile"] == "custom"  # subset and epochs, not the graphs, depart from paper
    assert "cuda_graphs" not in asked["overrides"]
    assert without_timings(read_metrics(tmp_path / "asked")) == without_timings(
        read_metrics(tmp_path / "eager"))


def test_an_observer_stops_a_run_cleanly_and_the_folder_says_why(tmp_path):
    seen = []

    def plateau(exp, row):
        seen.append(row["epoch"])
        return Stop("validation top-1 did not improve") if row["epoch"] == 1 else None

    summary = train(fast(epochs=3), tmp_path, quiet=True, callbacks=[OnEpoch(plateau)])
    assert seen == [1]
    assert summary["status"] == "stopped" and summary["epochs"] == 1
    assert summary["stop_reason"] == "validation top-1 did not improve"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert len(read_metrics(tmp_path)) == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with np.load(tmp_path / "predictions.npz") as z:
        assert z["predicted"].shape == z["labels"].shape == (1000,)  # the synthetic test set
