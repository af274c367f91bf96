"""Run folders under concurrency, full disks and edge-case sizes (issue 18)."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_study.cli import EXIT_USAGE, main
from resnet_study.data.loader import DeviceLoader
from resnet_study.files import hold
from resnet_study.study import plan, run_study
from resnet_study.training.train import EXIT_DIVERGED

from .helpers import presets

TINY = ["--data", "synthetic", "--subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--epochs", "1", "--device", "cpu", "--quiet"]


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_held_folder_refuses_a_second_train_and_keeps_its_temp_files(tmp_path, capsys):
    out = tmp_path / "run"
    with hold(out):
        live = out / ".checkpoint.pt.abc.tmp"  # the holder's write in progress
        live.write_bytes(b"half")
        code = main(["train", "resnet18-lr0.01", *TINY, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == EXIT_USAGE
        assert len(err) == 1
        assert f"in use by PID {os.getpid()} on {socket.gethostname()}" in err[0]
        assert live.read_bytes() == b"half"
        assert sorted(p.name for p in out.iterdir()) == [".checkpoint.pt.abc.tmp", ".lock"]


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "resnet18-lr0.01", *TINY, "--data", str(tmp_path / "none"),
                 "--out", str(out)]) == EXIT_USAGE
    assert not out.exists()


def test_a_study_leaves_held_runs_to_their_holder_then_trains_them(tmp_path):
    runs = plan(presets(["resnet18-lr0.01"]), 2, tmp_path / "s",
                {"data": "synthetic", "subset": 64, "test_subset": 32, "batch_size": 32,
                 "epochs": 1, "device": "cpu"}, quick=False)
    lines = []
    with hold(runs[0].out):
        outcomes = run_study(runs, log=lines.append)
    assert outcomes["held"] == [runs[0].label] and outcomes["completed"] == [runs[1].label]
    assert any(f"{runs[0].label} held by PID {os.getpid()}" in line for line in lines)
    assert not (runs[0].out / "summary.json").exists()  # nothing written into a held folder
    outcomes = run_study(runs, log=lines.append)
    assert outcomes["completed"] == [runs[1].label, runs[0].label]
    assert outcomes["skipped"] == [runs[1].label]


def consistent(run: Path, epochs: int) -> None:
    """summary.json, metrics.csv and the checkpoint tell the same story."""
    summary = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert summary["status"] == "completed" and summary["epochs"] == epochs
    assert [int(r["epoch"]) for r in rows(run / "metrics.csv")] == list(range(1, epochs + 1))
    assert ckpt["epoch"] == epochs and len(ckpt["history"]) == epochs


@pytest.mark.slow
def test_concurrent_studies_share_the_runs_and_train_each_once(tmp_path):
    """Finding 1: two identical studies started together both trained every run."""
    command = [sys.executable, "-m", "resnet_study", "study", "resnet18-lr0.01", "--seeds", "3",
               "--out", str(tmp_path / "s"), *TINY[:-1], "--epochs", "2"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    logs = "".join(err for _, _, err in results)
    trained = [line for line in logs.splitlines() if "training images" in line]
    assert len(trained) == 3, logs  # each run's start line, once
    for seed in range(3):
        consistent(tmp_path / "s" / "resnet18-lr0.01" / f"seed-{seed}", epochs=2)
    assert not list((tmp_path / "s").rglob(".*.tmp"))


def test_a_last_batch_of_one_joins_the_batch_before(tmp_path):
    """Finding 2: 257 images in batches of 64 crashed batch norm on the last image."""
    images = np.zeros((257, 3, 32, 32), np.uint8)
    loader = DeviceLoader(images, np.zeros(257, np.int64), batch_size=64, device="cpu",
                          mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1), augment=True)
    sizes = [len(y) for _, y in loader.epoch(0)]
    assert sizes == [64, 64, 64, 65] and len(loader) == 4
    test = DeviceLoader(images, np.zeros(257, np.int64), batch_size=64, device="cpu",
                        mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1), augment=False)
    assert [len(y) for _, y in test.epoch(0)] == [64, 64, 64, 64, 1]  # evaluation: as it was
    out = tmp_path / "run"
    assert main(["train", "resnet18-lr0.01", *TINY, "--subset", "33", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_a_non_finite_final_state_is_diverged(tmp_path, capsys):
    """Finding 7: weights that overflow at the last update trained on to `completed`."""
    out = tmp_path / "run"
    code = main(["train", "resnet18-lr0.01", *TINY, "--lr", "1e30", "--precision", "fp32",
                 "--out", str(out)])
    assert code == EXIT_DIVERGED
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert "non-finite" in capsys.readouterr().err


def on_a_small_disk(tmp_path: Path, size: str, args: list[str], copy_in: str | None,
                    keep: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the CLI with `args` ({disk} in them: a tmpfs of `size`, mounted in a mount namespace
    of its own), `tmp_path/copy_in` copied onto the disk first; returns the result and a copy
    of `keep` (under the disk) as the command left it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join([sys.executable, "-m", "resnet_study", *args]).format(disk=disk)
    copy = f"cp -r {tmp_path}/{copy_in} {disk}/{copy_in} && " if copy_in else ""
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && {copy}{command}; code=$?; "
              f"cp -a {disk}/{keep} {tmp_path}/after; exit $code")
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, timeout=300)
    return result, tmp_path / "after"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_full_disk_during_train_is_one_line_and_keeps_the_epoch_before(tmp_path):
    """Finding 3: on a tmpfs that holds one checkpoint but not the write of a second, the
    second epoch's checkpoint fails: one line, exit 1, and the first epoch's files whole."""
    result, after = on_a_small_disk(tmp_path, "120m", ["train", "resnet18-lr0.01", *TINY,
                                                       "--epochs", "2", "--out", "{disk}/run"],
                                    None, "run")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "No space left on device" in err[-1] and "checkpoint.pt" in err[-1]
    assert "Traceback" not in result.stderr
    assert [int(r["epoch"]) for r in rows(after / "metrics.csv")] == [1]
    assert torch.load(after / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert json.loads((after / "summary.json").read_text())["status"] == "failed"
    assert not list(after.glob(".*.tmp"))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_full_disk_during_report_is_one_line_and_leaves_each_file_whole(tmp_path):
    """Finding 4: a disk that filled during `report` left index.html truncated. Here the study
    (its checkpoints left out: `--no-inspect` does not read them) sits on a tmpfs with room for
    the tables but not for every figure."""
    runs = plan(presets(["resnet18-lr0.01"]), 2, tmp_path / "s",
                {"data": "synthetic", "subset": 64, "test_subset": 32, "batch_size": 32,
                 "epochs": 1, "device": "cpu"}, quick=False)
    run_study(runs, log=lambda m: None)
    for run in runs:
        (run.out / "checkpoint.pt").unlink()
        shutil.rmtree(run.out / "tensorboard", ignore_errors=True)
    result, after = on_a_small_disk(tmp_path, "700k", ["report", "{disk}/s", "--no-inspect"],
                                    "s", "s/report")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(err) == 1 and "No space left on device" in err[0], result.stderr
    assert {r["experiment"] for r in rows(after / "table1.csv")} >= {"resnet18-lr0.01"}
    ends = {".svg": b"</svg>", ".html": b"</html>", ".png": b"IEND\xaeB`\x82"}
    for f in after.iterdir():  # each file there is whole (the one that failed is not there)
        if f.suffix in ends:
            assert f.read_bytes().rstrip().endswith(ends[f.suffix]), f.name
    assert not list(after.glob(".*.tmp"))
