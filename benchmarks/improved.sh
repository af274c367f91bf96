#!/usr/bin/env bash
# Issue 20's acceptance: the improved ResNet-18s against the paper's rows, each study with its
# report, on the data given (default: the CIFAR-10 stand-in; every figure it gives is the
# stand-in's, not CIFAR-100's).
#
#   bash benchmarks/improved.sh [DATA] [OUT]      (DEVICES=0,1 for GPUs; default cpu,cpu)
#
#   base:      improved-resnet18, resnet18-lr0.01 and resnet18-adam, the paper's protocol (25
#              epochs, batch 256, all training images, the test split), SEEDS seeds each;
#   new-wide:  improved-resnet18-wide against new-wide-resnet18 on a 10,000-image subset
#              (SUBSET=none for the full protocol), 2 seeds each;
#   ablation:  the improved preset and its ablation group, a quick study (3 epochs, 1,000
#              images), its statistics against the improved preset.
# On this project's 2-core CPUs the first study alone takes about 1.3 h with bf16 (AMX; about
# 2.5 h in fp32) and the second about 50 min with bf16 (2 h 40 min in fp32); one H100 does all
# three in minutes. STUDIES=ablation runs just that one.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-runs/improved}
DEVICES=${DEVICES:-cpu,cpu}
SEEDS=${SEEDS:-2}
SUBSET=${SUBSET:-10000}
STUDIES=${STUDIES:-base new-wide ablation}
rs() { "$BIN/resnet-study" "$@"; }
for study in $STUDIES; do
    case $study in
    base)
        rs study improved-resnet18 resnet18-lr0.01 resnet18-adam --seeds "$SEEDS" \
            --data "$DATA" --devices "$DEVICES" --out "$OUT/base"
        rs report "$OUT/base" --base improved-resnet18 ;;
    new-wide)
        subset=(); [ "$SUBSET" = none ] || subset=(--subset "$SUBSET")
        rs study improved-resnet18-wide new-wide-resnet18 --seeds 2 "${subset[@]}" \
            --data "$DATA" --devices "$DEVICES" --out "$OUT/new-wide"
        rs report "$OUT/new-wide" --base improved-resnet18-wide ;;
    ablation)
        rs study improved-resnet18 --group improved-ablation --quick --seeds 2 \
            --data "$DATA" --devices "$DEVICES" --out "$OUT/ablation"
        rs report "$OUT/ablation" --base improved-resnet18 ;;
    *) echo "improved.sh: unknown study $study (base, new-wide, ablation)" >&2; exit 2 ;;
    esac
done
