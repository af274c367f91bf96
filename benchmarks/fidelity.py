"""Issue 31, part 1: does a search's low fidelity rank configurations as the protocol does?

    python benchmarks/fidelity.py WORKDIR [--data PATH] [--epochs 3,9,25] [--subset 10000]

Trains each configuration (the paper's rows that fit the base model's cost, and the entries of
benchmarks/fidelity/configurations.toml) as one complete one-cycle run at each number of
epochs, on the same images (--subset training images, --val-split held out, seed 0), then
prints each configuration's validation top-1 at each fidelity and Spearman's rho between each
fidelity's ranking and the longest's. Rerun, it goes on where the runs stand (a study). Numbers
measured on the CIFAR-10 stand-in are stand-in numbers, not CIFAR-100 ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
PAPER_ROWS = ["resnet18-lr0.1", "resnet18-lr0.01", "resnet18-lr0.001", "resnet18-no-bn",
              "resnet18-dropout", "resnet18-adam", "improved-resnet18"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--data", default=str(HERE.parents[1] / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--epochs", default="3,9,25", help="the fidelities, the protocol last")
    parser.add_argument("--subset", default="10000")
    parser.add_argument("--val-split", default="5000")
    parser.add_argument("--rows", default=",".join(PAPER_ROWS))
    args, extra = parser.parse_known_args()  # anything else goes to `study` (--device, ...)
    fidelities = [int(e) for e in args.epochs.split(",")]
    exe = str(Path(sys.executable).with_name("resnet-study"))
    for epochs in fidelities:
        subprocess.run([exe, "study", *args.rows.split(","), "--group", "fidelity",
                        "--experiments", str(HERE / "fidelity/configurations.toml"),
                        "--seeds", "1", "--out", str(args.workdir / f"epochs-{epochs}"),
                        "--data", args.data, "--subset", args.subset,
                        "--val-split", args.val_split, "--no-test-split",
                        "--epochs", str(epochs), *extra], check=True)
    table = {e: val_top1(args.workdir / f"epochs-{e}") for e in fidelities}
    names = sorted(table[fidelities[-1]], key=table[fidelities[-1]].get, reverse=True)
    print("| configuration | " + " | ".join(f"{e} epochs" for e in fidelities) + " |")
    print("|---|" + "---:|" * len(fidelities))
    for name in names:
        print(f"| `{name}` | " + " | ".join(f"{table[e][name]:.4f}" for e in fidelities) + " |")
    longest = [table[fidelities[-1]][n] for n in names]
    for e in fidelities[:-1]:
        rho = spearmanr([table[e][n] for n in names], longest).statistic
        print(f"Spearman's rho, {e} epochs against {fidelities[-1]}: {rho:.3f} "
              f"({len(names)} configurations)")


def val_top1(study: Path) -> dict[str, float]:
    """Each configuration's validation top-1 at the end of its run (seed 0)."""
    out = {}
    for summary in sorted(study.glob("*/seed-0/summary.json")):
        s = json.loads(summary.read_text())
        out[summary.parent.parent.name] = s["val_top1"] if s["status"] == "completed" else 0.0
    return out


if __name__ == "__main__":
    main()
