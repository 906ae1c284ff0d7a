#!/usr/bin/env bash
# GPU checks on one CUDA device, sized for a single H100 (under 10 minutes in all); installs nothing.
#
#   1. the gpu-marked tests:  python -m pytest -m gpu   (xformers == SDPA, a bf16 FSDP2 DINOv2 step)
#   2. a ViT-L/14 DINOv2 training step (2x224 + 8x98 crops, batch 32, bf16 autocast, fused AdamW, EMA):
#      images/s, MFU against the card's data-sheet peak, peak memory; eager (SDPA)
#   3. the ViT-g/14 recipe step (batch 12, activation checkpointing, 131072-prototype heads) through FSDP2
#      on one rank: peak memory against docs/scaling.md's estimate (must stay under 80 GB)
#   4. the ViT-L/14 step with DINOSCALE_ATTN=xformers (global and local crops in one block-diagonal call)
#   5. the ViT-L/14 step with compiled blocks
#
#   bash benchmarks/gpu.sh                    # results under benchmarks/gpu_results/<UTC time>/
#   bash benchmarks/gpu.sh --out DIR          # results in DIR
#   bash benchmarks/gpu.sh --dry-run          # print the plan and check the CPU side (no GPU needed)
#
# Each part runs under its own time limit and is recorded even when another fails; the exit status is
# non-zero when any part failed. Files written: env.txt, tests.txt, step.txt, step.jsonl, summary.txt.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=""
DRY_RUN=0
TESTS_LIMIT_S=90
EAGER_LIMIT_S=90
VITG_LIMIT_S=100
XFORMERS_LIMIT_S=60
COMPILED_LIMIT_S=240

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --out) [[ $# -ge 2 ]] || { echo "gpu.sh: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (use --out DIR, --dry-run)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-benchmarks/gpu_results/$(date -u +%Y%m%dT%H%M%SZ)}
if [[ $DRY_RUN -eq 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: torch sees no CUDA device; nothing to do (use --dry-run to check the script)" >&2
    exit 1
fi
mkdir -p "$OUT"

# Nothing may come from the network: pip and the model hubs are told so, in case anything asks.
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

TESTS=("$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests)
STEP=("$PYTHON" benchmarks/train_step.py --device cuda --configs vitl14 --steps 10 --warmup 3 --json "$OUT/step.jsonl")
VITG=("$PYTHON" benchmarks/train_step.py --device cuda --configs vitg14 --fsdp --steps 3 --warmup 2 \
      --json "$OUT/step.jsonl")
FAILED=()

# run NAME LIMIT_S LOG COMMAND...: the command under `timeout`, output appended to LOG and shown
run() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo "+ [$name, limit ${limit}s] $*" | tee -a "$OUT/summary.txt"
    if [[ $DRY_RUN -eq 1 ]]; then
        return 0
    fi
    local start=$SECONDS status=0
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log" || status=${PIPESTATUS[0]}
    echo "  -> $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    if [[ $status -ne 0 ]]; then
        FAILED+=("$name")
    fi
}

if [[ $DRY_RUN -eq 1 ]]; then
    echo "dry run: nothing is executed on a GPU; results would go to $OUT" | tee "$OUT/summary.txt"
    # The CPU side: the benchmark's arguments parse and the gpu tests are collected.
    "$PYTHON" benchmarks/train_step.py --help > /dev/null
    "$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/models/test_attention.py \
        tests/train/perf/test_meter.py | tee -a "$OUT/summary.txt"
else
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('device', torch.cuda.get_device_name(0))"
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
    } | tee "$OUT/env.txt"
fi

run "gpu tests" "$TESTS_LIMIT_S" "$OUT/tests.txt" "${TESTS[@]}"
run "ViT-L/14 step, eager" "$EAGER_LIMIT_S" "$OUT/step.txt" "${STEP[@]}" --variants bf16-eager
run "ViT-g/14 step, FSDP2 + AC" "$VITG_LIMIT_S" "$OUT/step.txt" "${VITG[@]}" --variants bf16-eager
run "ViT-L/14 step, eager, xformers" "$XFORMERS_LIMIT_S" "$OUT/step.txt" \
    env DINOSCALE_ATTN=xformers "${STEP[@]}" --variants bf16-eager
run "ViT-L/14 step, compiled blocks" "$COMPILED_LIMIT_S" "$OUT/step.txt" "${STEP[@]}" --variants bf16-compiled

if [[ $DRY_RUN -eq 1 ]]; then
    echo "dry run done: the plan above would run" | tee -a "$OUT/summary.txt"
elif [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "FAILED: ${FAILED[*]}; results in $OUT" | tee -a "$OUT/summary.txt"
    exit 1
else
    echo "all parts passed; results in $OUT" | tee -a "$OUT/summary.txt"
fi
