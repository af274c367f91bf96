import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    env = dict(os.environ, GPU_CHECK_TINY="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               RESNET_STUDY_DATA=str(tmp_path / "data"))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    graph_checks = ("SGD", "Adam + clip", "improved-resnet18 (", "improved-resnet18-wide (",
                    "Nesterov SGD, short warm-up, 3x3 stride-2 stem, on mixup's")
    for check in ("parameter counts", "bf16 vs fp32", "checkpoint resume",
                  *(f"CUDA graph step, {c}" for c in graph_checks)):
        assert check in summary and "FAILED" not in summary
    assert summary.count("4 steps uncaptured vs eager") == len(graph_checks)
    assert "CUDA graph step, dropout's masks" in summary and "a new mask each step" in summary
    for mode in ("eager", "graphs"):
        assert f"bench {mode} (img/s)" in summary and f"bench {mode} (model TFLOP/s)" in summary
    assert "graphs / eager" in summary
    for name, epochs in (("resnet-110", 164), ("wrn-16-8", 200)):
        line = next(line for line in summary.splitlines() if f"bench {name} " in line)
        assert "img/s at batch 2" in line and f"published recipe ({epochs} epochs)" in line
    base = next(line for line in summary.splitlines() if line.split()[:3] == ["base", "run,", "1"])
    assert "completed, top-1" in base and "graph not captured" in base  # no CUDA here
    wall, train, evaluation = map(float, re.search(
        r"wall (\S+) s \(the command, data cached\), of which (\S+) s training\+evaluation "
        r"\((\S+) s evaluation", base).groups())
    assert 0 < evaluation < train < wall
    assert re.search(r"decode the data \(once\)\s+\d+\.\d s", summary)
    assert "2/2 done" in summary  # one epoch of each of the two rows
    projected = next(line for line in summary.splitlines() if "PROJECTED 12 x 3 study" in line)
    assert "1 runs at once, from 2 measured rows" in projected
    assert "gpu_check:" in result.stdout and "passed" in result.stdout.splitlines()[-1]
