"""torchrun: two CPU processes over gloo train what one process trains."""

import csv
import re
import subprocess
import sys

import pytest
import torch

# 300 images in batches of 64: the last batch (44) is smaller, and split 22 + 22.
COMMON = ["resnet18-no-bn", "--data", "synthetic", "--subset", "300", "--test-subset", "128",
          "--batch-size", "64", "--eval-batch-size", "128", "--epochs", "2", "--device", "cpu",
          "--deterministic", "--quiet"]


# Two processes compute each half-batch's forward and backward separately and sum gradients in
# another order: equal to rounding. Measured largest differences (2026-11-27, AVX512-BF16 CPU):
# fp32 losses 4.5e-5 relative, weights 2.2e-5; bf16 losses 4.0e-4, weights 3.9e-4 (a bf16 ulp is
# 3.9e-3). The top-1 tolerance allows one of the 128 test images to flip in bf16.
TOLERANCE = {
    "fp32": {"loss_rel": 1e-4, "top1_abs": 1e-4, "weight_rtol": 1e-3, "weight_atol": 1e-4},
    "bf16": {"loss_rel": 4e-3, "top1_abs": 1 / 128, "weight_rtol": 1.6e-2, "weight_atol": 4e-3},
}


def metrics(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.precision
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path,
                                                                          auto_precision):
    tol = TOLERANCE[auto_precision]
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, "-m", "resnet_study", "train", *COMMON, "--out", str(single)],
                   check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resnet_study", "train", *COMMON, "--out", str(double)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(single), metrics(double)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "test_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=tol["loss_rel"]), key
        assert float(a["test_top1"]) == pytest.approx(float(b["test_top1"]),
                                                      abs=tol["top1_abs"])
    weights = [torch.load(d / "checkpoint.pt", weights_only=True)["model"]
               for d in (single, double)]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=tol["weight_rtol"],
                                   atol=tol["weight_atol"])
    assert f"cpu, {auto_precision}," in result.stderr  # the runs trained in that precision
    summary = (double / "summary.json").read_text()
    assert '"processes": 2' in summary


@pytest.mark.slow
def test_a_held_run_folder_stops_every_rank_at_once_with_one_line(tmp_path):
    """Issue 30: when rank 0 was refused the folder's lock, the other ranks waited in the
    process group until its timeout (minutes). Every rank now learns at once, and says rank
    0's line."""
    from resnet_study.training.run_folder import RunFolder

    out = tmp_path / "held"
    with RunFolder(out).hold():
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "resnet_study", "train", *COMMON, "--out", str(out)],
            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0  # torchrun adds its own report of the failed ranks
    refusals = re.findall(r"resnet-study: error: (\S+ is in use by PID \d+ on [^;]+);",
                          result.stderr)
    assert len(refusals) == 2 and len(set(refusals)) == 1, result.stderr[-3000:]
    assert not (out / "config.json").exists()


def test_leaving_the_group_collects_a_ddp_wrapper_left_in_a_reference_cycle():
    """A run's DDP wrapper outlives `train` in a reference cycle and holds the gloo group;
    collected only at interpreter exit, it aborted a rank after its run had ended well (CI,
    SIGABRT). `leave` collects it while Python is whole."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch import nn

    from resnet_study.ranks import leave

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cycle = {"ddp": nn.parallel.DistributedDataParallel(nn.Linear(2, 2))}
    cycle["self"] = cycle
    wrapper = weakref.ref(cycle["ddp"])
    del cycle
    gc.disable()  # as between two automatic collections
    try:
        assert wrapper() is not None
        leave()
        assert wrapper() is None and not dist.is_initialized()
    finally:
        gc.enable()
