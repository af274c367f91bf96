#!/usr/bin/env bash
# How cost grows: images/s and peak memory of the training step (compute) and loop (project)
# for widths k = 1, 2, 4, both stems and batch sizes 64 to 1024. Each point is its own process,
# so that its peak memory is its own. Prints a markdown table for benchmarks/RESULTS.md.
#   bash benchmarks/scaling.sh [DEVICE]        (default cpu; takes about 40 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEVICE=${1:-cpu}
OUT=$(mktemp -d)
point() {  # name, then bench flags
    local name=$1; shift
    echo "scaling: $name" >&2
    "$BIN/resnet-study" bench resnet18-lr0.01 --device "$DEVICE" --no-reference --json "$@" \
        > "$OUT/$name.json"
}
for b in 64 128 256 512 1024; do point "imagenet-k1-b$b" --batch-size "$b" --batches 4 --windows 3; done
for k in 2 4; do point "imagenet-k$k-b256" --width "$k" --batches 2 --windows 2 --warmup 1; done
point cifar-k1-b256 --stem cifar --batches 1 --windows 2 --warmup 1
point cifar-k2-b64 --stem cifar --width 2 --batch-size 64 --batches 1 --windows 2 --warmup 1
point cifar-k4-b64 --stem cifar --width 4 --batch-size 64 --batches 1 --windows 1 --warmup 1
"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| stem | width k | batch | compute img/s | project img/s | project/compute | peak memory MiB |")
print("|---|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(path.read_text())
    stem, k, b = path.stem.split("-")
    print(f"| {stem} | {k[1:]} | {b[1:]} | {r['compute']:,.1f} | {r['project']:,.1f} | "
          f"{r['project_over_compute']:.3f} | {r['peak_memory_mib']:,.0f} |")
PY
