"""The ViT-S/14 bf16 multi-crop step's matmuls and attention, timed inside the step and alone.

    python benchmarks/step_breakdown.py                  # batch 4, 5 timed steps
    python benchmarks/step_breakdown.py --steps 9 --reps 30

The step is ``backbone_vs_timm.py``'s (its functions are imported): our ViT-S/14 under bf16 autocast, forward and
backward of ``2B`` 224 px and ``8B`` 98 px crops, glibc keeping freed memory as in training. Timed with
``time.perf_counter`` around each call (CPU ops are synchronous), without a profiler:

* inside the step: every linear layer runs through :class:`TimedLinear`, an autograd function that computes what
  autograd computes for ``F.linear`` under autocast -- forward ``addmm(b, x, W^T)``; backward ``dy @ W``,
  ``(x^T @ dy)^T`` and the bias's ``dy.sum(0)`` -- and times each of those calls; the attention's autograd function
  (``dinoscale.models.attention._CPUMatmulAttention``) is timed whole, forward and backward. What is left of the
  step (LayerNorm, GELU, casts, residual adds, the patch embedding, autograd itself) is the step time minus these.
* alone: the same calls on tensors of the same shapes, dtypes and layouts, each repeated back to back (so its
  operands are in cache), median of ``--reps``, times the calls per step.

Printed: the plain step's time and share of the bf16 matmul peak (``dinoscale.train.perf.peak``, a 2048^3 matmul);
the instrumented step's time (the instrumentation's cost is the difference); then per linear layer (named by its
weight's shape: ViT-S/14 has qkv (1152, 384), proj (384, 384), fc1 (1536, 384) and fc2 (384, 1536)) and per
attention size, ms per step inside the step and alone, their ratio, and the rate alone in TFLOP/s against the peak.
Last, the ceiling of these kernels: the step's share of the peak if every timed call ran at its speed alone and
everything else (the rest) took no time.
On an AMX CPU the rate of single matmuls alone exceeds the square probe's, and the same calls run slower inside the
step than alone; this prints both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from backbone_vs_timm import autocast_for, build_models, loss_ours, make_batch, step, step_flops  # noqa: E402

import dinoscale.models.attention as attention  # noqa: E402
from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.train.perf.peak import peak_flops  # noqa: E402

PARTS = ("forward", "dX", "dW", "db")


class Timings:
    """Seconds per (component, part) summed over the instrumented steps, and one call's shapes for the replay."""

    def __init__(self) -> None:
        self.seconds: dict[tuple, float] = defaultdict(float)
        self.calls: dict[tuple, int] = defaultdict(int)
        self.shapes: dict[tuple, tuple] = {}
        self.recording = False

    def add(self, key: tuple, seconds: float, shapes: tuple) -> None:
        if self.recording:
            self.seconds[key] += seconds
            self.calls[key] += 1
            self.shapes.setdefault(key, shapes)


TIMINGS = Timings()


class TimedLinear(torch.autograd.Function):
    """``F.linear`` on 2-d-able inputs with autograd's own matmuls, each call timed into ``TIMINGS``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        start = time.perf_counter()
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        TIMINGS.add(("linear", tuple(weight.shape), "forward"), time.perf_counter() - start, (tuple(x2.shape),))
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype).contiguous()
        key = ("linear", tuple(weight.shape))
        start = time.perf_counter()
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # as autograd: no gradient for an input without one
        t_dx = time.perf_counter()
        dw = (x2.t() @ dy).t()
        t_dw = time.perf_counter()
        db = dy.sum(0) if ctx.has_bias else None
        t_db = time.perf_counter()
        shapes = (tuple(x2.shape),)
        if dx is not None:
            TIMINGS.add(key + ("dX",), t_dx - start, shapes)
        TIMINGS.add(key + ("dW",), t_dw - t_dx, shapes)
        if ctx.has_bias:
            TIMINGS.add(key + ("db",), t_db - t_dw, shapes)
        return None if dx is None else dx.view(ctx.x_shape), dw, db


def timed_linear(x, weight, bias=None):
    """Stands in for ``F.linear``: autocast's casts done here (outside the timed calls), then :class:`TimedLinear`."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return TimedLinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return TimedLinear.apply(x, weight, bias)


def timed_attention_class():
    """``_CPUMatmulAttention`` with its forward and backward timed whole into ``TIMINGS``."""
    base = attention._CPUMatmulAttention

    class TimedAttention(base):
        @staticmethod
        def forward(ctx, qkv, scale):
            start = time.perf_counter()
            out = base.forward(ctx, qkv, scale)
            TIMINGS.add(("attention", tuple(qkv.shape), "forward"), time.perf_counter() - start, (tuple(qkv.shape),))
            return out

        @staticmethod
        def backward(ctx, grad_out):
            start = time.perf_counter()
            grads = base.backward(ctx, grad_out)
            qkv_shape = tuple(ctx.saved_tensors[0].shape)
            TIMINGS.add(("attention", qkv_shape, "backward"), time.perf_counter() - start, (qkv_shape,))
            return grads

    return TimedAttention


def median_seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alone_seconds(key: tuple, shapes: tuple, reps: int) -> float:
    """One call of ``key`` on fresh bf16 tensors shaped as in the step, repeated back to back (median)."""
    dtype = torch.bfloat16
    if key[0] == "linear":
        (out_f, in_f), part = key[1], key[2]
        tokens = shapes[0][0]
        x = torch.randn(tokens, in_f, dtype=dtype)
        weight = torch.randn(out_f, in_f, dtype=dtype)
        bias = torch.randn(out_f, dtype=dtype)
        dy = torch.randn(tokens, out_f, dtype=dtype)
        fn = {
            "forward": lambda: torch.addmm(bias, x, weight.t()),
            "dX": lambda: dy @ weight,
            "dW": lambda: (x.t() @ dy).t(),
            "db": lambda: dy.sum(0),
        }[part]
        return median_seconds(fn, reps)
    qkv = torch.randn(shapes[0], dtype=dtype) * 1.5
    scale = qkv.shape[-1] ** -0.5
    grad = torch.randn(qkv.shape[1:], dtype=dtype)
    if key[2] == "forward":
        return median_seconds(lambda: attention.cpu_matmul_attention_packed(qkv), reps)
    leaf = qkv.clone().requires_grad_()

    def backward():
        out = attention._CPUMatmulAttention.apply(leaf, scale)
        out.backward(grad)

    both = median_seconds(backward, reps)
    return both - median_seconds(lambda: attention.cpu_matmul_attention_packed(qkv), reps)


def flops_of(key: tuple, shapes: tuple) -> float:
    """FLOPs of one call (matmuls only; a sum is not counted)."""
    if key[0] == "linear":
        out_f, in_f = key[1]
        return 0.0 if key[2] == "db" else 2.0 * shapes[0][0] * in_f * out_f
    _, bh, n, d = shapes[0]
    per_matmul = 2.0 * bh * n * n * d
    return 2 * per_matmul if key[2] == "forward" else 4 * per_matmul


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="source images per step (2B + 8B crops)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, plain and instrumented each")
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each call alone")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --reps must be >= 1, --warmup >= 0")
    keep_freed_memory()
    torch.manual_seed(0)
    model, _ = build_models(None)
    crops = make_batch(args.batch)
    autocast = autocast_for("bf16")
    flops = step_flops(model, crops)
    peak, _source = peak_flops(torch.device("cpu"), torch.bfloat16)

    for _ in range(args.warmup):
        step(model, loss_ours, crops, autocast)
    plain = statistics.median(step(model, loss_ours, crops, autocast) for _ in range(args.steps))

    original_linear, original_attention = F.linear, attention._CPUMatmulAttention
    F.linear, attention._CPUMatmulAttention = timed_linear, timed_attention_class()
    try:
        for _ in range(args.warmup):
            step(model, loss_ours, crops, autocast)
        TIMINGS.recording = True
        instrumented = statistics.median(step(model, loss_ours, crops, autocast) for _ in range(args.steps))
        TIMINGS.recording = False
    finally:
        F.linear, attention._CPUMatmulAttention = original_linear, original_attention

    print(f"ViT-S/14, bf16 autocast, batch {args.batch} ({2 * args.batch} x 224 + {8 * args.batch} x 98 px crops), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain step: {plain * 1e3:.1f} ms (median of {args.steps}), {flops / plain / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / plain / peak:.1f}% of the bf16 matmul peak ({peak / 1e9:.0f} GFLOP/s, 2048^3 probe)")
    print(f"instrumented step: {instrumented * 1e3:.1f} ms (the timers and the explicit casts cost the difference)")
    print()
    header = f"{'component':34s} {'in step':>9s} {'alone':>9s} {'in step':>8s} {'alone':>8s} {'alone':>7s}"
    print(header)
    print(f"{'':34s} {'ms/step':>9s} {'ms/step':>9s} {'/ alone':>8s} {'TFLOP/s':>8s} {'/ peak':>7s}")
    totals = defaultdict(lambda: [0.0, 0.0])
    for key in sorted(TIMINGS.seconds, key=lambda k: (k[0], k[1], PARTS.index(k[2]) if k[2] in PARTS else 9)):
        per_step_calls = TIMINGS.calls[key] / args.steps
        in_step = TIMINGS.seconds[key] / args.steps
        shapes = TIMINGS.shapes[key]
        one = alone_seconds(key, shapes, args.reps)
        alone = one * per_step_calls
        rate = flops_of(key, shapes) / one
        totals[key[0]][0] += in_step
        totals[key[0]][1] += alone
        if key[0] == "linear":
            name = f"linear {key[1]} {key[2]}"
        else:
            name = f"attention N={key[1][2]} {key[2]}"
        rate_cols = f"{rate / 1e12:8.2f} {100 * rate / peak:6.0f}%" if rate > 0 else f"{'-':>8s} {'-':>7s}"
        print(f"{name:34s} {in_step * 1e3:9.1f} {alone * 1e3:9.1f} {in_step / alone:7.2f}x {rate_cols}")
    print()
    accounted = 0.0
    for group, (in_step, alone) in totals.items():
        accounted += in_step
        print(f"{'all ' + group:34s} {in_step * 1e3:9.1f} {alone * 1e3:9.1f} {in_step / alone:7.2f}x")
    print(f"{'the rest of the instrumented step':34s} {(instrumented - accounted) * 1e3:9.1f}")
    # What eager kernels allow at best: the timed calls at their speed alone, everything else free.
    floor = sum(alone for _in_step, alone in totals.values())
    print(f"\nceiling: the timed calls at their speed alone and the rest free: {floor * 1e3:.1f} ms per step, "
          f"{100 * flops / floor / peak:.1f}% of the peak")


if __name__ == "__main__":
    main()
