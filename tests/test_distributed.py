"""torchrun: two CPU processes over gloo train what one process trains."""

import csv
import subprocess
import sys

import pytest
import torch

# 300 images in batches of 64: the last batch (44) is smaller, and split 22 + 22.
COMMON = ["resnet18-no-bn", "--data", "synthetic", "--subset", "300", "--test-subset", "128",
          "--batch-size", "64", "--eval-batch-size", "128", "--epochs", "2", "--device", "cpu",
          "--deterministic", "--quiet"]


def metrics(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
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
        for key in ("train_loss", "test_loss", "test_top1"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-4), key
    weights = [torch.load(d / "checkpoint.pt", weights_only=True)["model"]
               for d in (single, double)]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-3, atol=1e-4)
    summary = (double / "summary.json").read_text()
    assert '"processes": 2' in summary
