import os
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
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for check in ("parameter counts", "bf16 vs fp32", "checkpoint resume",
                  "CUDA graph step, SGD", "CUDA graph step, Adam + clip"):
        assert f"{check}" in summary and "FAILED" not in summary
    assert summary.count("12 steps uncaptured vs eager") == 2
    for mode in ("eager", "graphs"):
        assert f"bench {mode} (img/s)" in summary and f"bench {mode} (model TFLOP/s)" in summary
    assert "graphs / eager" in summary
    for name, epochs in (("resnet-110", 164), ("wrn-16-8", 200)):
        line = next(line for line in summary.splitlines() if f"bench {name} " in line)
        assert "img/s at batch 8" in line and f"published recipe ({epochs} epochs)" in line
    assert any(line.split()[:5] == ["base", "run,", "1", "epochs", "completed,"]
               for line in summary.splitlines())
    assert "(graph not captured)" in summary  # no CUDA here
    assert "2/2 done" in summary  # one epoch of each of the two rows
    projected = next(line for line in summary.splitlines() if "PROJECTED 12 x 3 study" in line)
    assert "1 runs at once, from 2 measured rows" in projected
    assert "gpu_check:" in result.stdout and "passed" in result.stdout.splitlines()[-1]
