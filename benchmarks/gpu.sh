#!/usr/bin/env bash
# GPU checks on one CUDA device, sized for a single H100 (under 10 minutes in all); fetches nothing.
#
#   1. the gpu-marked tests:  python -m pytest -m gpu   (xformers == SDPA, a bf16 FSDP2 DINOv2 step)
#   2. a ViT-L/14 DINOv2 training step (2x224 + 8x98 crops, batch 32, bf16 autocast, fused AdamW, EMA):
#      images/s, MFU against the card's data-sheet peak, peak memory; eager (SDPA)
#   3. the ViT-g/14 recipe step (batch 12, activation checkpointing, 131072-prototype heads) through FSDP2
#      on one rank: peak memory against docs/scaling.md's estimate (must stay under 80 GB)
#   4. the ViT-L/14 step with DINOSCALE_ATTN=xformers (global and local crops in one block-diagonal call); skipped,
#      with the reason, when xformers has no kernel for this torch and GPU
#   5. the ViT-L/14 step with compiled blocks
#
#   bash benchmarks/gpu.sh --commit "$(git rev-parse HEAD)"   # results under benchmarks/gpu_results/<UTC time>/
#   bash benchmarks/gpu.sh --commit SHA --out DIR             # results in DIR
#   bash benchmarks/gpu.sh --dry-run                          # print the plan and check the CPU side (no GPU needed)
#   bash benchmarks/gpu.sh --wheels .whl --commit SHA         # first install the wheels in .whl (for this run only)
#
# A lent GPU machine fetches nothing and lacks some requirements: make their wheels here with
# `bash benchmarks/gpu_wheels.sh` (into .whl/, about 0.5 MB), carry .whl along and pass --wheels .whl. They are
# installed into a temporary folder put on PYTHONPATH, nothing else on the machine changes. Before any part runs,
# every requirement of setup.py is checked (benchmarks/check_requirements.py, recorded in env.txt); a missing one
# stops the run at once, by name.
#
# --commit names the commit the caller copied to this machine. Give it: a copy of the working tree may carry a
# stale .git (`git rev-parse HEAD` on the device named 78ef1bf for runs made at 0278b9c and e68dcbd). Without it
# env.txt says "commit: unverified". env.txt also records a digest of the source that ran
# (benchmarks/source_digest.py); `python benchmarks/source_digest.py --check DIR/env.txt` compares it, on any
# machine with the repository, with the digest of the commit env.txt names.
#
# Each part runs under its own time limit and is recorded even when another fails; the exit status is
# non-zero when any part failed. Files written: env.txt, tests.txt, step.txt, step.jsonl, summary.txt.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=""
COMMIT=""
WHEELS=""
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
        --commit) [[ $# -ge 2 ]] || { echo "gpu.sh: --commit needs a commit id" >&2; exit 2; }; COMMIT="$2"; shift 2 ;;
        --wheels) [[ $# -ge 2 ]] || { echo "gpu.sh: --wheels needs a directory" >&2; exit 2; }; WHEELS="$2"; shift 2 ;;
        -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (use --commit SHA, --out DIR, --wheels DIR, --dry-run)" >&2; exit 2 ;;
    esac
done
if [[ -n $COMMIT && ! $COMMIT =~ ^[0-9a-f]{7,40}$ ]]; then
    echo "gpu.sh: --commit wants a commit id (7 to 40 hex digits), got '$COMMIT'" >&2
    exit 2
fi
if [[ -z $COMMIT ]]; then
    echo "gpu.sh: WARNING: no --commit given; env.txt will say 'commit: unverified' (this copy's .git may be stale)" >&2
fi
OUT=${OUT:-benchmarks/gpu_results/$(date -u +%Y%m%dT%H%M%SZ)}
if [[ -n $WHEELS ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "gpu.sh: no wheels in '$WHEELS' (make them with: bash benchmarks/gpu_wheels.sh $WHEELS)" >&2
        exit 2
    fi
    SITE=$(mktemp -d -t dinoscale-wheels.XXXXXX)
    trap 'rm -rf "$SITE"' EXIT
    if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"; then
        echo "gpu.sh: installing the wheels in '$WHEELS' failed" >&2
        exit 1
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
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

# env.txt: which code ran. The commit is the caller's word; the digest is computed here from the files themselves;
# what .git says is kept for the record only (it may be stale on a copy).
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [[ -n $COMMIT ]]; then
        echo "commit: $COMMIT (given with --commit)"
    else
        echo "commit: unverified (no --commit given)"
    fi
    here=$("$PYTHON" benchmarks/source_digest.py 2>&1 || echo "failed")
    echo "source digest: $here"
    echo "git HEAD of this copy (may be stale): $(git rev-parse HEAD 2>/dev/null || echo none)"
    if [[ -n $COMMIT ]] && git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
        there=$("$PYTHON" benchmarks/source_digest.py --commit "$COMMIT" 2>&1 || echo "failed")
        if [[ ${here%% *} == "${there%% *}" ]]; then same=yes; else same="NO (uncommitted changes ran?)"; fi
        echo "digest of that commit in this copy's .git: ${there%% *}; same as the source: $same"
    fi
    if [[ $DRY_RUN -eq 0 ]]; then
        "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('device', torch.cuda.get_device_name(0))"
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
    fi
} | tee "$OUT/env.txt"

# Every requirement of setup.py before anything runs: a missing one is named now, not minutes into a part.
if ! "$PYTHON" benchmarks/check_requirements.py 2>&1 | tee -a "$OUT/env.txt"; then
    echo "gpu.sh: requirements missing; make their wheels with 'bash benchmarks/gpu_wheels.sh' where pip works," \
         "carry .whl along and pass --wheels .whl" | tee -a "$OUT/summary.txt" >&2
    exit 1
fi

if [[ $DRY_RUN -eq 1 ]]; then
    echo "dry run: nothing is executed on a GPU; results would go to $OUT" | tee "$OUT/summary.txt"
    # The CPU side: the benchmark's arguments parse and the gpu tests are collected.
    "$PYTHON" benchmarks/train_step.py --help > /dev/null
    "$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/models/test_attention.py \
        tests/train/perf/test_meter.py | tee -a "$OUT/summary.txt"
fi

run "gpu tests" "$TESTS_LIMIT_S" "$OUT/tests.txt" "${TESTS[@]}"
run "ViT-L/14 step, eager" "$EAGER_LIMIT_S" "$OUT/step.txt" "${STEP[@]}" --variants bf16-eager
run "ViT-g/14 step, FSDP2 + AC" "$VITG_LIMIT_S" "$OUT/step.txt" "${VITG[@]}" --variants bf16-eager
# Without a usable xformers the step would fall back to SDPA and repeat part 2: say why and save the time.
if [[ $DRY_RUN -eq 0 ]] && ! why=$("$PYTHON" -c "import sys
from dinoscale.models.attention import _xformers_cuda_problem
problem = _xformers_cuda_problem()
print(problem or 'xformers runs here')
sys.exit(1 if problem else 0)" 2>&1); then
    echo "+ [ViT-L/14 step, eager, xformers] skipped: ${why##*$'\n'}" | tee -a "$OUT/summary.txt"
else
    run "ViT-L/14 step, eager, xformers" "$XFORMERS_LIMIT_S" "$OUT/step.txt" \
        env DINOSCALE_ATTN=xformers "${STEP[@]}" --variants bf16-eager
fi
run "ViT-L/14 step, compiled blocks" "$COMPILED_LIMIT_S" "$OUT/step.txt" "${STEP[@]}" --variants bf16-compiled

if [[ $DRY_RUN -eq 1 ]]; then
    echo "dry run done: the plan above would run" | tee -a "$OUT/summary.txt"
elif [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "FAILED: ${FAILED[*]}; results in $OUT" | tee -a "$OUT/summary.txt"
    exit 1
else
    echo "all parts passed; results in $OUT" | tee -a "$OUT/summary.txt"
fi
