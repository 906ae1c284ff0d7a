#!/usr/bin/env bash
# Regenerate the CPU section of benchmarks/RESULTS.md in one command: every CPU benchmark with the command
# RESULTS.md (and docs/scaling.md, the README) quotes, one .txt per benchmark in one dated folder.
#
#   bash benchmarks/run_all.sh                  # all of them (an hour or more on 2 cores); run on an idle machine
#   bash benchmarks/run_all.sh --quick          # tiny settings for each: a smoke test that every command runs
#   bash benchmarks/run_all.sh --only peak,layerscale_fold --out DIR
#
# Results: benchmarks/cpu_results/<UTC date and time>/ (with --quick: <...>-quick/, which git ignores), or --out.
# env.txt: date, `git rev-parse HEAD` and whether the tree had uncommitted changes (git status --porcelain),
# a digest of the source (benchmarks/source_digest.py), torch version and threads, CPU model, cores and its
# avx512_bf16 / amx flags, load. NAME.txt per benchmark: the command, its output, exit status and seconds.
# summary.txt: the same list in short. Each benchmark runs even when an earlier one failed; the exit status is
# non-zero when any failed. Threads: torch's default (all cores) unless OMP_NUM_THREADS is set.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
QUICK=0
OUT=""
ONLY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --out) [[ $# -ge 2 ]] || { echo "run_all.sh: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
        --only) [[ $# -ge 2 ]] || { echo "run_all.sh: --only needs a comma list" >&2; exit 2; }; ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run_all.sh: unknown argument '$1' (use --quick, --only NAMES, --out DIR)" >&2; exit 2 ;;
    esac
done
# This checkout's dinoscale, whatever is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Before the results folder exists (it would count as an untracked file).
DIRTY=$(git status --porcelain 2>/dev/null | wc -l)
STAMP=$(date -u +%Y%m%dT%H%MZ)
OUT=${OUT:-benchmarks/cpu_results/$STAMP$([[ $QUICK -eq 1 ]] && echo -quick)}
mkdir -p "$OUT"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ $DIRTY -eq 0 ]]; then
        echo "uncommitted changes: none"
    else
        echo "uncommitted changes: YES, $DIRTY paths (git status --porcelain); the digest below is of what ran"
    fi
    echo "source digest: $("$PYTHON" benchmarks/source_digest.py 2>&1)"
    echo "mode: $([[ $QUICK -eq 1 ]] && echo "QUICK (tiny settings: a smoke test, not results)" || echo full)"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, '| threads', torch.get_num_threads(), \
'| cpu capability', torch.backends.cpu.get_cpu_capability())"
    echo "OMP_NUM_THREADS: ${OMP_NUM_THREADS:-unset}"
    # nproc alone would honour OMP_NUM_THREADS
    echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc --all) cores" \
         "($("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)))') in this process's CPU affinity)"
    cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2-) "
    line="cpu flags:"
    for flag in avx512f avx512_bf16 amx_tile amx_bf16; do
        if [[ $cpu_flags == *" $flag "* ]]; then line+=" $flag=yes"; else line+=" $flag=no"; fi
    done
    echo "$line"
    echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"
echo "commands and times:" > "$OUT/summary.txt"

FAILED=()
# bench NAME COMMAND...: run it unless --only leaves it out; output to OUT/NAME.txt (appended: a name may run
# several commands) and to the terminal
bench() {
    local name=$1
    shift
    if [[ -n $ONLY && ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    local start=$SECONDS status=0
    echo "+ $*" | tee -a "$OUT/$name.txt"
    "$@" 2>&1 | tee -a "$OUT/$name.txt" || status=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    echo "-> exit $status after $took s" | tee -a "$OUT/$name.txt"
    echo "$name: exit $status, $took s: $*" >> "$OUT/summary.txt"
    [[ $status -eq 0 ]] || FAILED+=("$name")
}

P=$PYTHON
if [[ $QUICK -eq 0 ]]; then
    bench peak $P benchmarks/peak.py
    # RESULTS.md, newest CPU section: both dtypes, then fp32 alone in a second process; the older one: --compile
    bench backbone_vs_timm $P benchmarks/backbone_vs_timm.py --reps 21
    bench backbone_vs_timm $P benchmarks/backbone_vs_timm.py --dtypes fp32 --reps 21
    bench backbone_vs_timm_compile $P benchmarks/backbone_vs_timm.py --compile
    bench layerscale_fold $P benchmarks/layerscale_fold.py
    # which ops take the bf16 step's time besides the matmuls
    bench profile_step $P benchmarks/profile_step.py
    # the CPU attention kernels: time and accuracy
    bench attention_cpu $P benchmarks/attention_cpu.py
    # the step's linear layers and attention, inside the step and alone
    bench step_breakdown $P benchmarks/step_breakdown.py
    # the CPU patch embedding: convolution against the matmul PatchEmbed runs
    bench patch_embed_cpu $P benchmarks/patch_embed_cpu.py
    bench page_faults $P benchmarks/page_faults.py
    bench train_step $P benchmarks/train_step.py --configs quickstart,vits14
    # docs/scaling.md: activation checkpointing modes
    bench train_step_ac $P benchmarks/train_step.py --configs vits14 --variants fp32-eager --ac none,full,selective \
        --steps 5
    bench checkpoint_stall $P benchmarks/checkpoint_stall.py --md "$OUT/checkpoint_stall.md"
    bench extract_cpu $P benchmarks/extract_cpu.py
    bench scaling_cpu $P benchmarks/scaling_cpu.py
    bench bench_data $P tools/bench_data.py
    # the photometry's passes: bandwidth in and beyond L2, its functions inside the pipeline and alone
    bench photometry_memory $P benchmarks/photometry_memory.py
    # small images' crops: the resize kernel per crop against the batched matmuls; PNG decoding
    bench small_image_crops $P benchmarks/small_image_crops.py
    # docs/scaling.md: the activation model against measurement, and our configs' estimates
    bench memory_estimate $P benchmarks/memory_estimate.py --configs --measure
    for ac in false '"selective"' true; do
        bench memory_estimate_ac env MALLOC_MMAP_THRESHOLD_=65536 $P benchmarks/memory_estimate.py --measure-child \
            "{\"dim\": 192, \"depth\": 4, \"heads\": 3, \"batch\": 4, \"ffn_layer\": \"mlp\", \"ac\": $ac}"
    done
    # the README's quickstart figures (writes the Fashion-MNIST shards first, as a fresh checkout does)
    bench quickstart_wall $P benchmarks/quickstart_wall.py --md "$OUT/quickstart_wall.md"
else
    bench peak $P benchmarks/peak.py
    bench backbone_vs_timm $P benchmarks/backbone_vs_timm.py --batch 1 --reps 1 --warmup 0 --dtypes bf16
    bench layerscale_fold $P benchmarks/layerscale_fold.py --batch 1 --pairs 1 --warmup 0 --dtypes bf16
    bench profile_step $P benchmarks/profile_step.py --batch 1 --steps 1 --warmup 0
    bench attention_cpu $P benchmarks/attention_cpu.py --batch 1 --rounds 1 --warmup 0
    bench step_breakdown $P benchmarks/step_breakdown.py --batch 1 --steps 1 --warmup 0 --reps 1
    bench patch_embed_cpu $P benchmarks/patch_embed_cpu.py --rounds 1 --warmup 0
    bench page_faults $P benchmarks/page_faults.py --batch 1 --steps 1 --warmup 1 --processes 1
    bench train_step $P benchmarks/train_step.py --configs quickstart --variants bf16-eager --batch 8 --steps 1 \
        --warmup 0
    bench train_step_ac $P benchmarks/train_step.py --configs quickstart --variants fp32-eager \
        --ac none,full,selective --batch 8 --steps 1 --warmup 0
    bench checkpoint_stall $P benchmarks/checkpoint_stall.py --configs quickstart --steps 4 --every 2 \
        --md "$OUT/checkpoint_stall.md"
    bench extract_cpu $P benchmarks/extract_cpu.py --images 8 --batch 4 --size 56
    bench scaling_cpu $P benchmarks/scaling_cpu.py --global-batch 8 --steps 1 --warmup 0
    bench bench_data $P tools/bench_data.py --rounds 1 --repeats 1 --batches 2 --workers 1
    bench photometry_memory $P benchmarks/photometry_memory.py --passes 1 --photos 2 --reps 2
    bench small_image_crops $P benchmarks/small_image_crops.py --rounds 1 --warmup 0
    bench memory_estimate $P benchmarks/memory_estimate.py --configs
    bench memory_estimate_ac env MALLOC_MMAP_THRESHOLD_=65536 $P benchmarks/memory_estimate.py --measure-child \
        '{"dim": 64, "depth": 1, "heads": 1, "batch": 1, "ffn_layer": "mlp", "ac": "selective"}'
    # no shards written: Fashion-MNIST's files read directly, 10 steps, a small kNN
    bench quickstart_wall $P benchmarks/quickstart_wall.py --shards config --md "$OUT/quickstart_wall.md" -- \
        train.dataset=fashion-mnist:train train.build_shards_from=null train.max_steps=10 train.log_every=5 \
        evaluation.knn_max_train_samples=1000 evaluation.knn_max_test_samples=200
fi

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "FAILED: ${FAILED[*]}; results in $OUT" | tee -a "$OUT/summary.txt"
    exit 1
fi
echo "all benchmarks ran; results in $OUT" | tee -a "$OUT/summary.txt"
