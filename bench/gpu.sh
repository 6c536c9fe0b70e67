#!/usr/bin/env bash
# Every GPU figure bench/results/ needs, in ONE call of under 10 minutes on a machine lent a GPU
# (limits 170 + 100 + 70 + 60 + 90 + 100 s = 9 min 50 s at worst):
#
#   bash bench/gpu.sh                 # writes bench/results/*-gpu.md (commit them)
#   bash bench/gpu.sh --dry-run DIR   # tiny sizes on the CPU in about a minute (tests/test_gpu_script.py)
#
# 1. extraction: `cli extract` at its defaults vs the plain loop, WavLM Large architecture
#    (random weights), bf16 autocast for both, 30 min of audio, best of 2 alternated; then
#    a --batch-seconds sweep (50 and 400 vs the default 100) to check the GPU batch policy;
# 2. the head trainer's epoch on the GPU, 25-layer IEMOCAP-shaped cache (bench/train_head.py,
#    when it has --layer-scaling; else that part says so);
# 3. the stacked head trainer's arithmetic rate against the GPU's matmul peak, D = 512 and 1,024,
#    and its all-folds IEMOCAP extrapolation (bench/head_flops.py);
# 4. whole commands as users run them on the GPU: `cli baseline`, `train-head --all-folds` GAP and SR
#    (3 epochs) on a 2,000-utterance IEMOCAP-shaped one-layer cache (bench/head_speed.py --synthetic);
# 5. fine-tuning step time and peak memory at the paper's batch, 64 x 19 s (bench/finetune.py).
# Each part has its own time limit, and a part that fails does not stop the others: the
# summary at the end says which parts wrote results.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=bench/results
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
    OUT="${2:-$(mktemp -d)}"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sapser-gpu-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python}"
declare -A STATUS

part() {  # part NAME SECONDS COMMAND...: run with a time limit, remember how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    STATUS[$name]="exit $rc after $((SECONDS - start)) s"
    echo "=== $name: ${STATUS[$name]}"
}

if [[ $DRY == 1 ]]; then
    # one call covers both extraction parts' code paths (the plain loop, defaults and a variant)
    part extract 300 "$PY" bench/extract.py --dry-run --work "$WORK/extract" --variant "b2=--batch-seconds 2" \
        --results "$OUT/extract-gpu.md"
    STATUS[extract-batch]="covered by extract in a dry run"
    if "$PY" bench/train_head.py --help 2>/dev/null | grep -q -- "--layer-scaling"; then
        part train-head 300 "$PY" bench/train_head.py --layer-scaling --device cpu --layers 3 --dim 32 --utts 40 \
            --frames 40 --epochs 1 --poolings sr --cases one,pooled --dir "$WORK/head" --out "$OUT/train-head-gpu.md"
    else
        STATUS[train-head]="skipped: bench/train_head.py has no --layer-scaling on this branch"
    fi
    part head-flops 120 "$PY" bench/head_flops.py --device cpu --dim 32 --utts 40 --steps 2 --work "$WORK/flops" \
        --out "$OUT/head-flops-gpu.md"
    part head-speed 120 "$PY" bench/head_speed.py --synthetic 40 --rounds 1 --only gap --work "$WORK/speed" \
        --out "$OUT/head-speed-gpu.md" -- --device cpu --epochs 1 --min-steps 0
    part finetune 300 "$PY" bench/finetune.py --model tiny --device cpu --batch-size 4 --seconds 1 \
        --step-seconds 4 --steps 2 --workers 0 --checkpointing off --dir "$WORK/ft" --out "$OUT/finetune-gpu.md"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    part extract 170 "$PY" bench/extract.py --device cuda --arch large --amp bf16 --minutes 30 --repeats 2 \
        --work "$WORK/extract" --results "$OUT/extract-gpu.md"
    part extract-batch 100 "$PY" bench/extract.py --device cuda --arch large --amp bf16 --minutes 30 --repeats 1 \
        --work "$WORK/extract" --variant "b50=--batch-seconds 50" --variant "b400=--batch-seconds 400" \
        --results "$OUT/extract-gpu-batch.md"
    if "$PY" bench/train_head.py --help 2>/dev/null | grep -q -- "--layer-scaling"; then
        part train-head 70 "$PY" bench/train_head.py --layer-scaling --device cuda --layers 25 \
            --dir "$WORK/head" --out "$OUT/train-head-gpu.md"
    else
        STATUS[train-head]="skipped: bench/train_head.py has no --layer-scaling on this branch"
    fi
    part head-flops 60 "$PY" bench/head_flops.py --device cuda --dim 512 --dim 1024 --work "$WORK/flops" \
        --out "$OUT/head-flops-gpu.md"
    part head-speed 90 "$PY" bench/head_speed.py --synthetic 2000 --rounds 1 --only baseline,gap,default \
        --work "$WORK/speed" --out "$OUT/head-speed-gpu.md" -- --device cuda --epochs 3 --min-steps 0
    part finetune 100 "$PY" bench/finetune.py --model large --device cuda --batch-size 64 --seconds 19 \
        --step-seconds 200 --steps 4 --dir "$WORK/ft" --out "$OUT/finetune-gpu.md"
fi

echo "=== summary (results in $OUT)"
for name in extract extract-batch train-head head-flops head-speed finetune; do
    echo "$name: ${STATUS[$name]:-not run}"
done
