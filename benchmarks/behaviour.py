"""A fixed script whose outputs must not change when the code is reorganised.

    python benchmarks/behaviour.py OUT      # runs it, writes OUT/digest.txt
    diff BEFORE/digest.txt AFTER/digest.txt  # empty: the same behaviour, byte for byte

On the CPU with --deterministic: a 2-epoch synthetic `train` and its `evaluate`, a `study` of
2 experiments x 2 seeds (2 epochs, a synthetic subset), its `report --no-inspect`, and an
`inspect` of one run. The digest holds every metrics.csv without its timing columns, a hash of
every predictions.npz array and of every checkpoint tensor (model, optimiser, scheduler, scaler
and RNG states), table1.csv and statistics.csv without timing columns, the evaluation, and the
inspection's activations.csv. Only the public CLI is used, so any version of the code runs it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

COMMON = ["--data", "synthetic", "--batch-size", "64", "--deterministic", "--device", "cpu",
          "--precision", "fp32"]


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "resnet_study", *args], capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"behaviour: {' '.join(args[:2])} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def timing(column: str) -> bool:
    return "seconds" in column or "per_second" in column


def csv_text(path: Path) -> str:
    """The CSV without its timing columns, as text."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [c for c in (rows[0] if rows else []) if not timing(c)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keep, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def tensors(obj, prefix: str = ""):
    """Every tensor (and number) in a checkpoint, by its path in the nested containers."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        yield prefix, f"{obj.dtype} {list(obj.shape)} {hashlib.sha256(data).hexdigest()[:16]}"
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from tensors(obj[key], f"{prefix}.{key}")
    elif isinstance(obj, list | tuple) and all(isinstance(v, int | float) for v in obj):
        yield prefix, hashlib.sha256(repr(obj).encode()).hexdigest()[:16]  # Python's RNG state
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield prefix, repr(obj)


def digest_run(run: Path) -> list[str]:
    lines = [f"## {run.name if run.parent.name == 'work' else run.parent.name + '/' + run.name}",
             csv_text(run / "metrics.csv")]
    with np.load(run / "predictions.npz") as z:
        lines += [f"predictions {k} {hashlib.sha256(z[k].tobytes()).hexdigest()[:16]}"
                  for k in sorted(z.files)]
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    for section in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch"):
        lines += [f"checkpoint {path} {value}" for path, value in tensors(ckpt[section],
                                                                         section)]
    return lines


def main(out: Path) -> None:
    work = out / "work"
    if work.exists():
        sys.exit(f"behaviour: {work} exists; give an empty OUT")
    train = work / "train"
    cli("train", "resnet18-lr0.01", "--subset", "512", "--test-subset", "256", "--epochs", "2",
        "--out", str(train), "--quiet", *COMMON)
    evaluation = json.loads(cli("evaluate", str(train), "--json"))
    study = work / "study"
    cli("study", "resnet18-lr0.01", "resnet18-adam", "--seeds", "2", "--epochs", "2",
        "--subset", "256", "--test-subset", "256", "--out", str(study), *COMMON)
    cli("report", str(study), "--no-inspect")
    inspected = study / "resnet18-lr0.01" / "seed-0"
    cli("inspect", str(inspected), "--images", "256", "--json")

    lines = digest_run(train)
    lines.append(f"evaluate {json.dumps({k: v for k, v in evaluation.items() if k != 'run'})}")
    for run in sorted(study.glob("*/seed-*")):
        lines += digest_run(run)
    for table in ("table1.csv", "statistics.csv"):
        lines += [f"## report/{table}", csv_text(study / "report" / table)]
    lines += ["## inspect/activations.csv", csv_text(inspected / "inspect" / "activations.csv")]
    (out / "digest.txt").write_text("\n".join(lines) + "\n")
    print(f"behaviour: {out / 'digest.txt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
