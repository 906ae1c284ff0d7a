"""LayerScale folded into the linear layers against scaling the branch output: an A/B on the same weights.

    python benchmarks/layerscale_fold.py                       # fp32 and bf16, 15 pairs, batch 4
    python benchmarks/layerscale_fold.py --dtypes bf16 --pairs 31

Our ``Block`` applies LayerScale inside the branch's last linear layer: ``scaled_linear`` multiplies the weight
and bias of ``attn.proj`` and ``mlp.fc2`` by ``gamma`` (a ``(D, D)`` and a ``(D, 4D)`` product per block) instead
of multiplying the ``(tokens, D)`` branch output. Both compute ``x + gamma * branch(x)``; the fold saves one
elementwise pass over the tokens per branch (forward and backward) and keeps no branch output for ``gamma``'s
gradient. B (output scaling) is the block as it was before the fold (6a619e2), rebuilt here as
:class:`OutputScaledBlock`: a benchmark-only subclass; the model code has no switch for it.

The step is ``backbone_vs_timm.py``'s (its functions are imported, not copied): ViT-S/14 with LayerScale 1e-5 and
timm's initialisation, forward and backward of ``2B`` 224 px and ``8B`` 98 px crops under fp32 or bf16 autocast.
A and B are one model and its deep copy, so they hold the same weights; they are checked to compute the same
function first. Then ``--pairs`` pairs of steps run back to back (A first in even pairs, B first in odd ones,
after ``--warmup`` untimed steps of each). Printed per dtype: the median images/s of each, and the speed ratio
A / B within each pair (B's time over A's; > 1: folding is faster): its median, a bootstrap 95% interval of the
median (``backbone_vs_timm.paired_ratio``) and the range over the pairs.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from backbone_vs_timm import (  # noqa: E402  (also puts the repository on sys.path)
    GLOBAL_SIZE, LOCAL_SIZE, N_GLOBAL, N_LOCAL, autocast_for, build_models, loss_ours, make_batch, paired_ratio, step,
)

from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.models.vit import Block, pack_crops, unpack_crops  # noqa: E402


class OutputScaledBlock(Block):
    """``Block`` with LayerScale on the branch outputs, ``x + ls1(attn(norm1(x)))``, as before the fold.

    Same parameters and function as ``Block``; only where ``gamma`` multiplies differs (the output tensor here,
    the weight and bias of ``proj`` / ``fc2`` there).
    """

    def forward(self, x, crop_shapes=None):
        if isinstance(x, (list, tuple)):
            packed, shapes = pack_crops(x)
            return unpack_crops(self.forward(packed, shapes), shapes)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), crop_shapes)), crop_shapes)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), crop_shapes)


def output_scaled_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose blocks scale their branch outputs (:class:`OutputScaledBlock`)."""
    other = copy.deepcopy(model)
    for block in other.blocks:
        if type(block) is not Block:
            raise TypeError(f"expected dinoscale.models.vit.Block, got {type(block).__name__}")
        block.__class__ = OutputScaledBlock
    return other


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, crops) -> float:
    """Largest difference of the normalised tokens of the two models (fp32, no grad)."""
    with torch.no_grad():
        outs_a, outs_b = a.forward_features(list(crops)), b.forward_features(list(crops))
    return max((oa[k] - ob[k]).abs().max().item()
               for oa, ob in zip(outs_a, outs_b) for k in ("x_norm_clstoken", "x_norm_patchtokens"))


def bench(batch: int, pairs: int, warmup: int, dtype: str) -> dict:
    folded, _timm = build_models(None)
    del _timm
    unfolded = output_scaled_copy(folded)
    err = max_abs_diff(folded, unfolded, make_batch(1, seed=1))
    if err > 1e-4:
        raise RuntimeError(f"folded and output-scaled LayerScale disagree by {err:.3g}; the comparison is void")
    crops = make_batch(batch)
    autocast = autocast_for(dtype)
    runs = {"folded": folded, "output": unfolded}
    times = {name: [] for name in runs}
    for _ in range(warmup):
        for model in runs.values():
            step(model, loss_ours, crops, autocast)
    for i in range(pairs):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(step(runs[name], loss_ours, crops, autocast))
    ratios = [b / a for a, b in zip(times["folded"], times["output"])]
    return {
        "max_abs_diff": err,
        "img_s": {name: batch / statistics.median(ts) for name, ts in times.items()},
        "paired": paired_ratio(times["folded"], times["output"]),  # B's time over A's, per pair
        "range": (min(ratios), max(ratios)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="source images per step (2B + 8B crops)")
    parser.add_argument("--pairs", type=int, default=15, help="timed pairs of steps (one of each variant)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.pairs < 1 or args.warmup < 0:
        parser.error("--batch and --pairs must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_kept = keep_freed_memory()  # as training and backbone_vs_timm.py do on CPU
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, "
          f"batch {args.batch} ({N_GLOBAL * args.batch}x{GLOBAL_SIZE} + {N_LOCAL * args.batch}x{LOCAL_SIZE} crops), "
          f"glibc keeps freed memory: {malloc_kept}")
    print("A: LayerScale folded into proj/fc2 (the model); B: LayerScale on the branch outputs (before 6a619e2)")
    print(f"{'dtype':5} {'A img/s':>8} {'B img/s':>8}  A/B paired median [95% interval]  range over pairs")
    for dtype in args.dtypes.split(","):
        dtype = dtype.strip()
        r = bench(args.batch, args.pairs, args.warmup, dtype)
        p = r["paired"]
        print(f"{dtype:5} {r['img_s']['folded']:8.2f} {r['img_s']['output']:8.2f}  "
              f"{p['median']:.3f}x [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] over {p['n']} pairs  "
              f"{r['range'][0]:.3f}-{r['range'][1]:.3f}   (max |A - B| {r['max_abs_diff']:.1e})", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
