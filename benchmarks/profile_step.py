"""Where the ViT-S/14 multi-crop step spends its time besides the matmuls: torch.profiler, ops grouped by kind.

    python benchmarks/profile_step.py                      # bf16 autocast, batch 4, 3 profiled steps
    python benchmarks/profile_step.py --dtype fp32 --top 25

The step is ``backbone_vs_timm.py``'s (its functions are imported): our ViT-S/14, forward and backward of ``2B``
224 px and ``8B`` 98 px crops, with glibc keeping freed memory as in training (``dinoscale.cpu_malloc``; without
it, page faults land in the ops that allocate). After ``--warmup`` steps, ``--steps`` steps run under
``torch.profiler`` (CPU activities); every aten op's *self* CPU time is put in one group:

* matmul: ``mm``, ``addmm``, ``bmm``, ``baddbmm`` (the linear layers and the CPU attention's matmuls);
* attention kernel: the fused ``scaled_dot_product`` kernels and their backward;
* softmax, layer norm, gelu: those ops and their backward;
* dtype casts: ``copy_`` / ``_to_copy`` (autocast's casts to and from bf16 land here, as do layout copies);
* elementwise: add, mul, div, the residual and LayerScale arithmetic, fill and zero;
* other: everything else (views cost next to nothing; what is left is named in the top list).

Printed: the step time, its share of the matmul peak (``dinoscale.train.perf.peak``), each group's share of the
profiled time, and the ``--top`` ops by self time. On a machine whose bf16 matmuls are much faster than its
memory-bound ops (AMX), the non-matmul groups are where the step's time goes; this tells which ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from backbone_vs_timm import autocast_for, build_models, loss_ours, make_batch, step, step_flops  # noqa: E402

from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.train.perf.peak import peak_flops  # noqa: E402

GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention kernel", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax", ("softmax",)),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("dtype casts and copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::fill_", "aten::zero_",
                     "aten::addcmul", "aten::neg", "aten::sum", "aten::where")),
)


def group_of(name: str) -> str:
    """The group of an aten op name (first match in ``GROUPS``; ``other`` when none)."""
    for group, patterns in GROUPS:
        if any(p in name for p in patterns):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", type=int, default=4, help="source images per step (2B + 8B crops)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed by self time")
    args = parser.parse_args()

    keep_freed_memory()  # as training and backbone_vs_timm.py do on CPU: no page faults for reused tensors
    ours, _ = build_models(None)
    crops = make_batch(args.batch)
    autocast = autocast_for(args.dtype)
    for _ in range(args.warmup):
        step(ours, loss_ours, crops, autocast)
    plain = [step(ours, loss_ours, crops, autocast) for _ in range(args.steps)]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(ours, loss_ours, crops, autocast)
        profiled_s = time.perf_counter() - start

    per_op = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            per_op[event.key] += event.self_cpu_time_total / 1e6
    total = sum(per_op.values())
    groups = defaultdict(float)
    for name, seconds in per_op.items():
        groups[group_of(name)] += seconds

    flops = step_flops(ours, crops)
    step_s = sorted(plain)[len(plain) // 2]
    peak, _ = peak_flops("cpu", torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    print(f"ViT-S/14, {args.dtype}, batch {args.batch} ({2 * args.batch} x 224 + {8 * args.batch} x 98 px crops), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"step (unprofiled median of {len(plain)}): {step_s:.3f} s, {flops / step_s / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / step_s / peak:.1f}% of the {args.dtype} matmul peak ({peak / 1e9:.0f} GFLOP/s)")
    print(f"profiled: {profiled_s / args.steps:.3f} s per step; aten self CPU time summed over threads: "
          f"{total / args.steps:.3f} s per step\n")
    print(f"{'group':26s} {'s/step':>8s} {'share':>7s}")
    for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{group:26s} {seconds / args.steps:8.3f} {100 * seconds / total:6.1f}%")
    print(f"\ntop {args.top} ops by self CPU time:")
    for name, seconds in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:40s} {seconds / args.steps:8.3f} s/step {100 * seconds / total:6.1f}%  [{group_of(name)}]")


if __name__ == "__main__":
    main()
