#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on an H100, nothing installed beyond a PyTorch
# image (numpy, pillow, tqdm, matplotlib, scipy, torchvision) and no network.
#
#   bash benchmarks/gpu_check.sh                     # on a CUDA machine
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh    # on a CPU, tiny sizes (a test runs this)
#
# It checks the CUDA path (parameter counts, bf16 against float32, checkpoint and resume on the
# device, the captured CUDA-graph step against the eager one), runs `resnet-study bench` eager
# and with --cuda-graphs, decodes the CIFAR-10 JPEG stand-in into the data cache (timed on its
# own, as it happens once), trains the base model for 25 epochs on it with --cuda-graphs (wall
# time of the command, and its training and evaluation time), then trains one full-data epoch
# of every row of Table 1 as a study (runs per GPU chosen automatically) and projects the whole
# 12 x 3 study at 25 epochs from it. It writes its logs under $OUT (default: a new temporary
# folder) and ends with a short table. The stand-in is read from $GPU_CHECK_DATA (default
# .gpu/cifar10-jpeg.tar.gz, a git-ignored copy of ../shared/data/cifar10-jpeg.tar.gz).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
export RESNET_STUDY_DATA=${RESNET_STUDY_DATA:-$WORK/data}
study() { "$PYTHON" -m resnet_study "$@"; }

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
    DEVICE=cpu DATA=synthetic BUDGET=600
    BENCH=(--batch-size 32 --batches 1 --windows 1)
    LITERATURE=(--batch-size 2 --batches 1 --windows 1 --warmup 1)
    BASE=(--epochs 1 --subset 256 --test-subset 256 --batch-size 64)
    ROWS=(resnet18-lr0.01 resnet18-adam --subset 128 --test-subset 128 --batch-size 64)
else
    DEVICE=cuda DATA=${GPU_CHECK_DATA:-.gpu/cifar10-jpeg.tar.gz} BUDGET=480
    BENCH=(--batches 20 --windows 5)
    LITERATURE=(--batch-size 128 --batches 10 --windows 3)
    BASE=()
    ROWS=(--all)
    if [ ! -f "$DATA" ]; then
        echo "gpu_check: stand-in $DATA not found; copy ../shared/data/cifar10-jpeg.tar.gz" \
             "there or set GPU_CHECK_DATA" >&2
        exit 2
    fi
fi
echo "gpu_check: device $DEVICE, data $DATA, logs in $OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/env.txt"
failed=0

echo "== CUDA path: parameter counts, bf16 vs float32, checkpoint and resume"
"$PYTHON" benchmarks/gpu_check.py cuda-path "$DEVICE" "$WORK" 2>&1 | tee "$OUT/cuda_path.log"
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
cp "$WORK/cuda_path.json" "$OUT/" 2>/dev/null

# The reference pipeline (a DataLoader) is the same in both modes: measured once, with eager.
for mode in eager graphs; do
    echo "== bench ($mode)"
    flags=$([ $mode = graphs ] && echo --cuda-graphs --no-reference || echo --no-cuda-graphs)
    study bench resnet18-lr0.01 --device "$DEVICE" --json "${BENCH[@]}" $flags \
        > "$OUT/bench-$mode.json" 2> "$OUT/bench-$mode.log" \
        || { failed=1; tail -3 "$OUT/bench-$mode.log"; rm -f "$OUT/bench-$mode.json"; }
    cat "$OUT/bench-$mode.json" 2>/dev/null
done

for name in resnet-110 wrn-16-8; do
    echo "== bench $name (the literature rows' networks, batch of their published recipe)"
    study bench $name --device "$DEVICE" --json --no-reference "${LITERATURE[@]}" \
        > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.log" \
        || { failed=1; tail -3 "$OUT/bench-$name.log"; rm -f "$OUT/bench-$name.json"; }
done

# Decoded once, as a user's first run does, so that the base run's wall time is a repeat run's.
echo "== decode $DATA into the data cache"
now() { date +%s.%N; }
start=$(now)
"$PYTHON" -c "import sys; from resnet_study.data.store import load_images; load_images(sys.argv[1])" \
    "$DATA" || failed=1
echo "$start $(now)" > "$OUT/decode-times.txt"  # start and end, in seconds

echo "== base model, 25-epoch recipe, --cuda-graphs, on $DATA"
start=$(now)
study train resnet18-lr0.01 --data "$DATA" --device "$DEVICE" --out "$WORK/base" --quiet \
    --cuda-graphs "${BASE[@]}" 2>&1 | tee "$OUT/base.log"
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
echo "$start $(now)" > "$OUT/base-times.txt"
cp "$WORK/base/summary.json" "$OUT/base-summary.json" 2>/dev/null
cp "$WORK/base/metrics.csv" "$OUT/base-metrics.csv" 2>/dev/null

left=$((BUDGET - SECONDS))
if [ "$left" -gt 60 ]; then
    echo "== one full-data epoch of every row, --cuda-graphs (${left} s left of ${BUDGET} s)"
    timeout "$left" "$PYTHON" -m resnet_study study "${ROWS[@]}" --seeds 1 --epochs 1 \
        --data "$DATA" --out "$WORK/study" --device "$DEVICE" --cuda-graphs \
        > "$OUT/study.log" 2>&1
    rc=$?
    # A run that fails offline (ImageNet weights) or the budget running out is reported, not fatal.
    [ "$rc" = 124 ] && echo "study: stopped at the time budget" >> "$OUT/study.log"
    grep '^study:' "$OUT/study.log" | tail -3
    "$PYTHON" benchmarks/gpu_check.py projection "$WORK/study" "$OUT"
else
    echo "== study epochs skipped: ${left} s left of the ${BUDGET} s budget"
fi

"$PYTHON" benchmarks/gpu_check.py table "$OUT" | tee "$OUT/summary.txt"
echo "gpu_check: ${SECONDS} s, $([ $failed = 0 ] && echo passed || echo FAILED)"
rm -rf "$WORK"
exit $failed
