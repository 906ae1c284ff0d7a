"""Backbone speed gate: dinoscale's ViT-S/14 against timm's ``vit_small_patch14_dinov2`` on DINOv2's crops.

    python benchmarks/backbone_vs_timm.py                      # fp32 and bf16, eager, batch 4
    python benchmarks/backbone_vs_timm.py --compile            # also torch.compile'd (per block for ours)
    python benchmarks/backbone_vs_timm.py --batch 8 --reps 7 --dtypes bf16

One step = forward and backward of the multi-crop batch: ``2B`` global crops of 224 px and ``8B`` local
crops of 98 px (patch 14, so 257 and 50 tokens), a sum over the normalised CLS and patch tokens as the loss.
Ours runs the two resolutions through the blocks together (``forward_features([g, l])``); timm, which has
no multi-crop forward, runs them one after the other (``dynamic_img_size=True``) and sums the losses.
Both models hold the same weights (timm's initialisation converted into ours) and are checked to compute
the same function before timing. bf16 means ``torch.autocast("cpu", torch.bfloat16)`` around the step.

Timed repetitions are interleaved (ours, timm, ours, timm, ...) after warm-up, so a change in machine load
hits both; the script prints the median and best images/s of each and the ratio ours / timm (> 1: ours is
faster), and the ratio within each back-to-back pair with a bootstrap 95% interval of its median (an
interval that contains 1 means the two are as fast as each other within this machine's noise).
Images/s counts the B source images of a step (each has 2 global and 8 local crops). Like training
on CPU, the script first lets glibc keep freed memory (``dinoscale.cpu_malloc``), for both models.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.hub import load_state_dict_any  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402
from dinoscale.train.perf.flops import count_forward_flops  # noqa: E402
from dinoscale.train.perf.peak import peak_flops  # noqa: E402

PATCH = 14
GLOBAL_SIZE, N_GLOBAL = 224, 2
LOCAL_SIZE, N_LOCAL = 98, 8


def build_models(compile_mode: str | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, timm) ViT-S/14 with LayerScale 1e-5 and identical weights.

    Position embeddings are made for 224 px in both, resized for the 98 px crops the way timm does it
    (target size given directly, antialiased bicubic), so the two compute the same function.
    """
    import timm

    torch._dynamo.reset()  # graphs of an earlier variant must not count against the recompile limit
    theirs = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=GLOBAL_SIZE, dynamic_img_size=True
    )
    ours = build_backbone(
        "vit_small", patch_size=PATCH, img_size=GLOBAL_SIZE, init_values=1e-5, interpolate_offset=0.0, interpolate_antialias=True
    )
    load_state_dict_any(ours, theirs.state_dict())
    ours.train(), theirs.train()
    if compile_mode == "blocks":
        for block in ours.blocks:
            block.compile()
        for block in theirs.blocks:
            block.compile()
    return ours, theirs


def make_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    globals_ = torch.randn(N_GLOBAL * batch, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=g)
    locals_ = torch.randn(N_LOCAL * batch, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g)
    return globals_, locals_


def loss_ours(model: torch.nn.Module, crops: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    outs = model.forward_features(list(crops))
    return sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)


def loss_timm(model: torch.nn.Module, crops: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for x in crops:
        out = model.forward_features(x)  # (B, 1 + N, D), normalised
        total = total + out[:, 0].float().sum() + out[:, 1:].float().sum()
    return total


class _MultiCrop(torch.nn.Module):
    """Ours on a list of crops, as a module of tensors (for the FLOP count)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *crops):
        return [o["x_norm_clstoken"] + o["x_norm_patchtokens"].sum(1) for o in self.model.forward_features(list(crops))]


def step_flops(model, crops) -> float:
    """FLOPs of one forward + backward (backward = 2 x forward; see dinoscale.train.perf.flops)."""
    return 3 * count_forward_flops(_MultiCrop(model), *crops)


def step(model, loss_fn, crops, autocast) -> float:
    """One forward + backward; returns seconds."""
    start = time.perf_counter()
    with autocast():
        loss = loss_fn(model, crops)
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def check_same_function(ours, theirs, crops) -> float:
    """Largest |ours - timm| over the normalised tokens of both crop sizes (fp32, no grad)."""
    with torch.no_grad():
        outs = ours.forward_features(list(crops))
        worst = 0.0
        for o, x in zip(outs, crops):
            ref = theirs.forward_features(x)
            mine = torch.cat([o["x_norm_clstoken"].unsqueeze(1), o["x_norm_patchtokens"]], dim=1)
            worst = max(worst, (mine - ref).abs().max().item())
    return worst


def autocast_for(dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext
    if dtype == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"unknown dtype {dtype!r}; expected fp32 or bf16")


def bench(batch: int, reps: int, warmup: int, dtype: str, compile_mode: str | None) -> dict:
    ours, theirs = build_models(compile_mode)
    crops = make_batch(batch)
    err = check_same_function(ours, theirs, make_batch(1, seed=1))
    if err > 1e-3:
        raise RuntimeError(f"ours and timm disagree by {err:.3g} on the same weights; the comparison is void")
    autocast = autocast_for(dtype)
    runs = {"ours": (ours, loss_ours), "timm": (theirs, loss_timm)}
    times = {name: [] for name in runs}
    for _ in range(warmup):
        for name, (model, fn) in runs.items():
            step(model, fn, crops, autocast)
    for rep in range(reps):
        # alternate which goes first, so neither always follows the other's cache state
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            model, fn = runs[name]
            times[name].append(step(model, fn, crops, autocast))
    result = {"max_abs_diff": err, "step_flops": step_flops(ours, crops)}
    for name, ts in times.items():
        result[name] = {"median_img_s": batch / statistics.median(ts), "best_img_s": batch / min(ts),
                        "median_s": statistics.median(ts), "best_s": min(ts)}
    result["ratio_median"] = result["ours"]["median_img_s"] / result["timm"]["median_img_s"]
    result["ratio_best"] = result["ours"]["best_img_s"] / result["timm"]["best_img_s"]
    result["paired"] = paired_ratio(times["ours"], times["timm"])
    return result


def paired_ratio(ours_s: list[float], timm_s: list[float], resamples: int = 2000) -> dict:
    """Speed ratio ours / timm of each repetition's pair (timm's time over ours), its median and a
    bootstrap 95% interval of that median: the pairs ran back to back, so slow phases of the machine
    cancel within a pair, and the interval says whether a difference is larger than the noise."""
    import numpy as np

    ratios = np.asarray(timm_s) / np.asarray(ours_s)
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, size=(resamples, len(ratios))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(ratios)), "ci95": (float(low), float(high)), "n": len(ratios)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="source images per step (2B + 8B crops)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per model first (blocks are compiled during the first)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (both models)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--batch and --reps must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_kept = keep_freed_memory()  # as training does on CPU; the same for both models (one process)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, "
          f"batch {args.batch} ({N_GLOBAL * args.batch}x{GLOBAL_SIZE} + {N_LOCAL * args.batch}x{LOCAL_SIZE} crops), "
          f"glibc keeps freed memory: {malloc_kept} (DINOSCALE_KEEP_MALLOC=0 turns it off)")
    modes = [None, "blocks"] if args.compile else [None]
    print(f"{'dtype':5} {'mode':8} {'ours img/s':>17} {'timm img/s':>17} {'ours/timm':>15}  "
          f"{'ours GFLOP/s':>17} {'MFU':>13}  (median / best)")
    for dtype in args.dtypes.split(","):
        dtype = dtype.strip()
        peak, source = peak_flops("cpu", torch.bfloat16 if dtype == "bf16" else torch.float32)
        for mode in modes:
            r = bench(args.batch, args.reps, args.warmup, dtype, mode)
            rate = [r["step_flops"] / r["ours"][k] for k in ("median_s", "best_s")]
            print(
                f"{dtype:5} {mode or 'eager':8} "
                f"{r['ours']['median_img_s']:8.2f} / {r['ours']['best_img_s']:6.2f} "
                f"{r['timm']['median_img_s']:8.2f} / {r['timm']['best_img_s']:6.2f} "
                f"{r['ratio_median']:7.3f} / {r['ratio_best']:5.3f}  "
                f"{rate[0] / 1e9:8.1f} / {rate[1] / 1e9:6.1f} "
                f"{rate[0] / peak:6.1%} / {rate[1] / peak:5.1%}",
                flush=True,
            )
            p = r["paired"]
            print(f"{'':14} paired ours/timm over {p['n']} pairs: median {p['median']:.3f}, "
                  f"95% interval [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]", flush=True)
        print(f"      peak {dtype}: {peak / 1e9:.1f} GFLOP/s ({source})")
    print(f"      step: {r['step_flops'] / 1e9:.1f} GFLOP (forward + backward, 1 multiply-add = 2 FLOPs)")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
