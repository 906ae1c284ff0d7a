"""CPU attention kernels on the ViT-S/14 multi-crop shapes: time of forward + backward, and accuracy.

    python benchmarks/attention_cpu.py                      # bf16 autocast, batch 4, 15 rounds
    python benchmarks/attention_cpu.py --batch 8 --rounds 25 --threads 1

One call = attention of one block over the ``2B`` global crops (257 tokens) and the ``8B`` local crops (50
tokens) of ``backbone_vs_timm.py``'s step, 6 heads of 64, bf16 q/k/v under ``torch.autocast("cpu",
torch.bfloat16)`` (how training runs), forward and backward. Three kernels compute the same function:

* ``ours``: :func:`dinoscale.models.attention.cpu_matmul_attention` (q/k/v packed into one tensor, then the
  kernel ``Attention`` runs on CPU): float32 scores and softmax, bf16 matmuls in the backward;
* ``fused``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused CPU kernel: float32
  accumulation; on AMX CPUs its matmuls use AMX tiles);
* ``bf16 matmuls``: ``softmax(q k^T / sqrt(d)) v`` written out under autocast (what facebookresearch/dinov2's
  ``Attention`` computes on CPU: the scores are rounded to bf16 and the softmax runs in bf16).

Rounds are interleaved (each kernel once per round) after a warm-up; printed: the median and best
milliseconds per call of each kernel, its ratio to ``ours``, and its error against a float64 computation
of the same inputs (relative Frobenius norm of the output and of the q, k and v gradients; q and k are
drawn with standard deviation 2, so the logits are large enough for rounding them to show).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.models.attention import cpu_matmul_attention, math_attention  # noqa: E402

HEADS, HEAD_DIM = 6, 64
TOKENS = ((2, 257), (8, 50))  # (crops per image, tokens per crop): 224 px and 98 px at patch 14


KERNELS = {"ours": cpu_matmul_attention, "fused": F.scaled_dot_product_attention, "bf16 matmuls": math_attention}


def make_inputs(batch: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per crop size, q/k/v ``(B, heads, N, d)`` in float32 (q and k with std 2) and the output's gradient."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for crops, n in TOKENS:
        shape = (crops * batch, HEADS, n, HEAD_DIM)
        q, k = (2 * torch.randn(shape, generator=g) for _ in range(2))
        v, grad = (torch.randn(shape, generator=g) for _ in range(2))
        sets.append([q, k, v, grad])
    return sets


def call(kernel, sets: list[list[torch.Tensor]], dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """Forward + backward of ``kernel`` over every crop size; returns (output, dq, dk, dv) per size."""
    results = []
    for q, k, v, grad in sets:
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float64):
            out = kernel(*leaves)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), *(t.grad for t in leaves)))
    return results


def relative_errors(results, reference) -> list[float]:
    """Relative Frobenius error of (output, dq, dk, dv), over all crop sizes together."""
    errors = []
    for i in range(4):
        diff = sum(float((r[i].double() - ref[i]).square().sum()) for r, ref in zip(results, reference))
        norm = sum(float(ref[i].square().sum()) for ref in reference)
        errors.append((diff / norm) ** 0.5)
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="source images (2B + 8B crops)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each kernel once per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--batch and --rounds must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training does on CPU
    sets = make_inputs(args.batch)
    reference = call(math_attention, sets, torch.float64)

    times: dict[str, list[float]] = {name: [] for name in KERNELS}
    for r in range(args.warmup + args.rounds):
        for name, kernel in KERNELS.items():
            start = time.perf_counter()
            call(kernel, sets, torch.bfloat16)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    errors = {name: relative_errors(call(fn, sets, torch.bfloat16), reference) for name, fn in KERNELS.items()}

    caps = torch.backends.cpu.get_cpu_capability()
    amx = torch.cpu._is_amx_tile_supported() if hasattr(torch.cpu, "_is_amx_tile_supported") else "unknown"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {caps}, AMX tiles: {amx}, "
          f"load {os.getloadavg()[0]:.2f}")
    shapes = " + ".join(f"{c * args.batch}x{HEADS}x{n}x{HEAD_DIM}" for c, n in TOKENS)
    print(f"one call: forward + backward over q/k/v {shapes} (B x heads x N x d), bf16 autocast, "
          f"{args.rounds} interleaved rounds\n")
    base = statistics.median(times["ours"])
    print(f"{'':43s} relative error vs float64")
    columns = "".join(f"{c:>9s}" for c in ("out", "dq", "dk", "dv"))
    print(f"{'kernel':14s} {'median ms':>10s} {'best ms':>8s} {'/ ours':>7s}  {columns}")
    for name in KERNELS:
        median = statistics.median(times[name])
        e = errors[name]
        print(f"{name:14s} {1e3 * median:10.2f} {1e3 * min(times[name]):8.2f} {median / base:7.2f}   "
              f"{e[0]:8.2e} {e[1]:8.2e} {e[2]:8.2e} {e[3]:8.2e}")


if __name__ == "__main__":
    main()
