"""Memory per GPU of DINOv2 pretraining for ViT-S/B/L/g (patch 14), with and without sharding.

    python benchmarks/memory_estimate.py                 # the table (markdown)
    python benchmarks/memory_estimate.py --gpu-gb 40     # max batch per GPU for a 40 GB card
    python benchmarks/memory_estimate.py --measure       # cross-check the activation model on CPU
    python benchmarks/memory_estimate.py --configs       # also dinoscale's own configs/train/*.yaml
    python benchmarks/memory_estimate.py --against benchmarks/gpu_results/20261128T0537Z/step.jsonl
                                                         # the estimate of exactly what gpu.sh measured

Per GPU, with S = number of GPUs the parameters are sharded over (1 = no sharding) and P the
student parameter count (backbone + heads; the teacher has the same P):

    states       = (4 + 4 + 8) * P / S  +  4 * P / S      fp32 master weights, fp32 gradients,
                                                          AdamW exp_avg + exp_avg_sq; fp32 EMA teacher
    compute      = 2 * P                 (S = 1)           bf16 copies of the weights used in forward/backward
                 = 2 * (2 + 2 + 4) * U   (S > 1)           two FSDP units in flight (current + prefetched):
                                                          bf16 params, bf16 grads, fp32 reduce-scatter copy;
                                                          U = parameters of the largest unit (a block or a head)
    activations  = (L * a + D) * T * 2 + L * w * 2      (no AC)   a = elements stored per token per block
                                                          (bf16), D for the input of the final LayerNorm,
                                                          w = LayerScale-scaled weights a block keeps
                 = (L * D + a + D) * T * 2 + w * 2      (AC)      block inputs only + one block recomputed
    heads        = rows * (K * 10 + (D + 5 H + 2 Bn) * 2)  student logits (bf16 out, fp32 copy, fp32
                                                          log-softmax) + head MLP activations,
                   + teacher rows * K * 12                 teacher logits / centering / softmax (transient)
    overhead     = 3 GiB                                   CUDA context, NCCL buffers, allocator slack

T = tokens per GPU = B * (2 * (1 + 256) + 8 * (1 + 49)) for 2 x 224 px and 8 x 98 px crops at patch 14.
The numbers ``a`` (stored elements per token per block) and ``w`` (per block) are read off the block's
forward (``dinoscale.models.vit.Block``); see ``stored_per_token`` and ``stored_per_block`` below.

Three sources of rows: ``RECIPES``, facebookresearch/dinov2's own recipes (their config files, named in each row);
``--configs``, this repository's ``configs/train/*.yaml`` (read with ``dinoscale.config.load_config``: model, heads,
batch and activation checkpointing as configured; the two differ: our ``train/vitl14.yaml`` is DINOv2's default
recipe at patch 14, batch 64, MLP, one shared 65536-prototype head, while DINOv2's ``train/vitl14.yaml`` has batch
32, SwiGLU and two 131072-prototype heads); and ``--against``, one row per step ``benchmarks/train_step.py``
measured on a GPU (its ``--json`` lines), estimated for that step's config, overrides, batch and FSDP setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dinoscale.config import load_config  # noqa: E402
from dinoscale.models import vit  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402
from dinoscale.models.heads import DINOHead  # noqa: E402
from dinoscale.parallel import activation_checkpointing_mode  # noqa: E402

GiB = 1024**3
PATCH = 14
GLOBAL_CROPS = (2, 224)  # number, side in pixels
LOCAL_CROPS = (8, 98)
HEAD_HIDDEN = 2048
HEAD_NLAYERS = 3
# DINOv2 masks half of the global crops with ratios spread over [0.1, 0.5] (mean 0.3).
IBOT_MASKED_FRACTION = 0.5 * 0.3
LAYERSCALE = 1e-5
OVERHEAD_BYTES = 3 * GiB
SHARDINGS = (1, 8, 64)
# dinoscale's own recipes for --configs (configs/<name>.yaml)
OWN_CONFIGS = ("train/vits14", "train/vitb14", "train/vitl14", "train/vitg14")


@dataclass(frozen=True)
class Recipe:
    """One model, its heads and its batch per GPU (numbers from the config named in ``source``)."""

    name: str
    builder: str  # function in dinoscale.models.vit
    ffn_layer: str
    batch_per_gpu: int
    n_prototypes: int
    bottleneck_dim: int
    separate_ibot_head: bool
    source: str


RECIPES = (
    # DINOv2 trains only L and g from scratch; S and B use the default config (their released
    # weights are distilled from g).
    Recipe("ViT-S/14", "vit_small", "mlp", 64, 65536, 256, False, "facebookresearch/dinov2 ssl_default_config.yaml"),
    Recipe("ViT-B/14", "vit_base", "mlp", 64, 65536, 256, False, "facebookresearch/dinov2 ssl_default_config.yaml"),
    Recipe("ViT-L/14", "vit_large", "swiglufused", 32, 131072, 384, True, "facebookresearch/dinov2 train/vitl14.yaml"),
    Recipe("ViT-g/14", "vit_giant2", "swiglufused", 12, 131072, 384, True, "facebookresearch/dinov2 train/vitg14.yaml"),
)


def config_recipe(config: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, bool]:
    """(recipe, activation checkpointing) of one of our configs (``load_config(config, overrides)``).

    The model must be a DINOv2-layout ViT at patch 14 (what the formulas model); selective activation
    checkpointing is not modelled (ValueError).
    """
    cfg = load_config(config, list(overrides))
    arch, patch = cfg.model.arch, cfg.model.patch_size
    if arch not in ("vit_small", "vit_base", "vit_large", "vit_giant2") or patch != PATCH:
        raise ValueError(f"{config}: the estimate models DINOv2-layout ViTs at patch {PATCH}, got {arch}/{patch}")
    ac = activation_checkpointing_mode(cfg.compute.activation_checkpointing)
    if ac == "selective":
        raise ValueError(f"{config}: selective activation checkpointing is not modelled here (see docs/scaling.md)")
    dino, ibot = cfg.dino, cfg.ibot
    if ibot.separate_head and (ibot.head_n_prototypes, ibot.head_bottleneck_dim) != (
            dino.head_n_prototypes, dino.head_bottleneck_dim):
        raise ValueError(f"{config}: the estimate assumes the iBOT head has the DINO head's size")
    ffn = vit_ffn_layer(arch, cfg.model.ffn_layer)
    name = {"vit_small": "ViT-S/14", "vit_base": "ViT-B/14", "vit_large": "ViT-L/14", "vit_giant2": "ViT-g/14"}[arch]
    recipe = Recipe(name, arch, ffn, int(cfg.train.batch_size_per_rank), int(dino.head_n_prototypes),
                    int(dino.head_bottleneck_dim), bool(ibot.separate_head),
                    f"configs/{config}.yaml" + (f" {' '.join(overrides)}" if overrides else ""))
    return recipe, ac == "full"


def vit_ffn_layer(arch: str, configured: str) -> str:
    """The FFN the built model has: the architecture's own (ViT-g is SwiGLU) unless the config sets one."""
    from dinoscale.models.factory import ARCHS

    return configured if configured != "mlp" else ARCHS[arch].get("ffn_layer", "mlp")


def tokens_per_image(patch: int = PATCH, registers: int = 0) -> tuple[int, int]:
    """(student tokens, teacher tokens) per image: all crops for the student, globals for the teacher."""
    (n_global, g_side), (n_local, l_side) = GLOBAL_CROPS, LOCAL_CROPS
    g_tokens = 1 + registers + (g_side // patch) ** 2
    l_tokens = 1 + registers + (l_side // patch) ** 2
    return n_global * g_tokens + n_local * l_tokens, n_global * g_tokens


def ffn_hidden(ffn_layer: str, mlp_hidden: int) -> int:
    """Width of the FFN's hidden layer: ``mlp_hidden`` for the MLP, SwiGLU's h' (its last linear's input)."""
    if ffn_layer == "mlp":
        return mlp_hidden
    if ffn_layer in ("swiglu", "swiglufused"):
        return vit.swiglu_hidden_features(mlp_hidden)
    raise ValueError(f"unknown ffn_layer {ffn_layer!r}")


def stored_per_token(dim: int, ffn_layer: str, mlp_hidden: int, layerscale_folded: bool = True) -> float:
    """Elements autograd keeps per token per block for the backward (flash-style attention, so
    no tokens x tokens matrix is stored).

    Attention branch: LayerNorm input (1), qkv input (1), q/k/v (3), attention output saved by
    the kernel (1) and its reshaped copy fed to ``proj`` (1).
    MLP branch: LayerNorm input (1), fc1 input (1), fc1 output = GELU input (h), GELU output = fc2
    input (h). SwiGLU branch: w12 input (1), w12 output (2 h'), SiLU output (h'), product = w3
    input (h'), with h' = 2/3 h rounded up to a multiple of 8.
    LayerScale keeps nothing per token: the block folds it into ``proj`` / the FFN's last linear. With
    ``layerscale_folded=False`` (the block before 6a619e2, which scaled the branch outputs) each branch also kept
    its output for ``gamma``'s gradient (1 per branch).
    """
    ls = 0 if layerscale_folded else 1
    attention = 1 + 1 + 3 + 1 + 1 + ls
    h = ffn_hidden(ffn_layer, mlp_hidden)
    ffn = 1 + 1 + (2 * h if ffn_layer == "mlp" else 4 * h) / dim + ls
    return (attention + ffn) * dim


def stored_per_block(dim: int, ffn_layer: str, mlp_hidden: int, layerscale_folded: bool = True) -> float:
    """Elements a block with LayerScale keeps for the backward besides the per-token ones: the
    weights of ``proj`` (D x D) and of the FFN's last linear (D x h, D x h' for SwiGLU) scaled by
    LayerScale's gamma, which the block folds into them (a fresh tensor each forward). None before the fold."""
    if not layerscale_folded:
        return 0
    return dim * dim + dim * ffn_hidden(ffn_layer, mlp_hidden)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_numbers(recipe: Recipe) -> dict:
    """Parameter counts from the real model definitions, built on the meta device (no memory)."""
    with torch.device("meta"):
        backbone = build_backbone(
            recipe.builder, patch_size=PATCH, img_size=GLOBAL_CROPS[1], init_values=LAYERSCALE, ffn_layer=recipe.ffn_layer
        )
        dim = backbone.embed_dim
        head = DINOHead(dim, recipe.n_prototypes, hidden_dim=HEAD_HIDDEN, bottleneck_dim=recipe.bottleneck_dim, nlayers=HEAD_NLAYERS)
    n_heads = 2 if recipe.separate_ibot_head else 1
    block = _count(backbone.blocks[0])
    root = _count(backbone) - block * len(backbone.blocks)
    return {
        "dim": dim,
        "depth": len(backbone.blocks),
        "backbone": _count(backbone),
        "heads": n_heads * _count(head),
        "largest_unit": max(block, root, _count(head)),
    }


def estimate(recipe: Recipe, *, shards: int, activation_checkpointing: bool, batch: int | None = None,
             fsdp: bool | None = None, layerscale_folded: bool = True) -> dict:
    """Bytes per GPU for one training step, split by component (see the module docstring).

    ``fsdp``: whether the networks are FSDP units (default: when ``shards > 1``); FSDP on one rank shards
    nothing but gathers unit by unit, so its compute copies are the two units in flight. ``layerscale_folded``:
    False for the code before 6a619e2 (see :func:`stored_per_token`).
    """
    m = model_numbers(recipe)
    B = recipe.batch_per_gpu if batch is None else batch
    D, L = m["dim"], m["depth"]
    P = m["backbone"] + m["heads"]
    student_tokens, _ = tokens_per_image()
    T = B * student_tokens
    # mlp_hidden is the nominal 4 * D; stored_per_token applies the SwiGLU rounding itself.
    a = stored_per_token(D, recipe.ffn_layer, 4 * D, layerscale_folded)
    w = stored_per_block(D, recipe.ffn_layer, 4 * D, layerscale_folded)

    states = (4 + 4 + 8) * P / shards + 4 * P / shards
    sharded_units = shards > 1 if fsdp is None else fsdp
    compute = 2 * (2 + 2 + 4) * m["largest_unit"] if sharded_units else 2 * P
    if activation_checkpointing:
        activations = L * T * D * 2 + (T * a + w) * 2
    else:
        activations = L * (T * a + w) * 2
    # outside the blocks only the final LayerNorm keeps its input (the patch embedding saves the images)
    activations += T * D * 2

    n_global = GLOBAL_CROPS[0]
    patches_global = (GLOBAL_CROPS[1] // PATCH) ** 2
    n_masked = IBOT_MASKED_FRACTION * n_global * B * patches_global
    student_rows = B * (GLOBAL_CROPS[0] + LOCAL_CROPS[0]) + n_masked
    teacher_rows = B * n_global + n_masked
    K = recipe.n_prototypes
    heads = student_rows * (K * 10 + (D + 5 * HEAD_HIDDEN + 2 * recipe.bottleneck_dim) * 2)
    heads += teacher_rows * K * 12
    total = states + compute + activations + heads + OVERHEAD_BYTES
    return {
        "params": P,
        "tokens": T,
        "states": states,
        "compute": compute,
        "activations": activations,
        "heads": heads,
        "overhead": OVERHEAD_BYTES,
        "total": total,
    }


def max_batch(recipe: Recipe, *, shards: int, activation_checkpointing: bool, gpu_bytes: float) -> int:
    """Largest batch per GPU whose estimate fits ``gpu_bytes`` (the estimate is linear in B)."""
    kw = dict(shards=shards, activation_checkpointing=activation_checkpointing)
    fixed = estimate(recipe, batch=0, **kw)["total"]
    per_sample = estimate(recipe, batch=1, **kw)["total"] - fixed
    return max(0, int((gpu_bytes - fixed) // per_sample))


def table(gpu_gb: float, rows: list[tuple[Recipe, tuple[bool, ...]]] | None = None) -> str:
    """The markdown table: each recipe at each of ``SHARDINGS`` with the listed AC settings (default: the
    DINOv2 ``RECIPES`` with and without AC)."""
    gpu_bytes = gpu_gb * 1e9
    if rows is None:
        rows = [(r, (False, True)) for r in RECIPES]
    lines = [
        f"| model | params (student) | batch/GPU | tokens/GPU | sharded over | AC | states | compute copies "
        f"| activations | heads | total | fits {gpu_gb:g} GB | max batch/GPU |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r, acs in rows:
        for shards in SHARDINGS:
            for ac in acs:
                e = estimate(r, shards=shards, activation_checkpointing=ac)
                lines.append(
                    f"| {r.name} | {e['params'] / 1e6:,.0f} M | {r.batch_per_gpu} | {e['tokens']:,} "
                    f"| {shards if shards > 1 else 'none'} | {'yes' if ac else 'no'} "
                    f"| {e['states'] / GiB:.1f} | {e['compute'] / GiB:.1f} | {e['activations'] / GiB:.1f} "
                    f"| {e['heads'] / GiB:.1f} | **{e['total'] / GiB:.1f}** "
                    f"| {'yes' if e['total'] <= gpu_bytes else 'NO'} "
                    f"| {max_batch(r, shards=shards, activation_checkpointing=ac, gpu_bytes=gpu_bytes)} |"
                )
    return "\n".join(lines)


def recipe_line(r: Recipe) -> str:
    m = model_numbers(r)
    return (f"- {r.name}: backbone {m['backbone'] / 1e6:,.1f} M, heads {m['heads'] / 1e6:,.1f} M "
            f"({'DINO + iBOT' if r.separate_ibot_head else 'shared DINO/iBOT'}, {r.n_prototypes} prototypes), "
            f"D={m['dim']}, depth {m['depth']}, {r.ffn_layer}, batch {r.batch_per_gpu}, "
            f"{stored_per_token(m['dim'], r.ffn_layer, 4 * m['dim']) / m['dim']:.2f} D stored per token per block; "
            f"from {r.source}")


def against(jsonl: str | Path) -> str:
    """Measured peak memory of ``benchmarks/train_step.py --json`` rows (CUDA, bf16) next to the estimate of
    exactly that step: its config and overrides (``train_step.CONFIGS``), batch, AC and FSDP setting, one rank.

    ``torch.cuda.max_memory_allocated`` sees tensors only, so the comparison is with the estimate less its fixed
    overhead (CUDA context, NCCL buffers, allocator slack). Two estimates: for the block with LayerScale on the
    branch outputs (the code before 6a619e2) and for today's folded block.
    """
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_step

    lines = [
        "| step (train_step.py) | model, heads | batch | AC | FSDP (1 rank) | measured peak allocated "
        "| estimate less overhead: LayerScale on outputs (before 6a619e2) / folded (today) | measured / estimate |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for line in Path(jsonl).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("peak_memory_gib") is None or not row["variant"].startswith("bf16"):
            continue  # CPU rows have no comparable peak; the estimate models bf16 activations
        config, overrides, _batch = train_step.CONFIGS[row["config"]]
        overrides = [*overrides, f"train.batch_size_per_rank={row['batch']}"]
        if row.get("ac"):  # train_step.py --ac (rows written before it existed have no such key)
            overrides.append(f"compute.activation_checkpointing={row['ac']}")
        recipe, ac = config_recipe(config, overrides)
        est = [estimate(recipe, shards=1, activation_checkpointing=ac, fsdp=bool(row.get("fsdp")),
                        layerscale_folded=folded) for folded in (False, True)]
        tensors = [(e["total"] - e["overhead"]) / GiB for e in est]
        heads = f"{'DINO + iBOT' if recipe.separate_ibot_head else 'one shared'} {recipe.n_prototypes}"
        lines.append(
            f"| {row['config']} {row['variant']}{' DINOSCALE_ATTN=' + row['attn_env'] if row.get('attn_env') else ''} "
            f"| {recipe.name} {recipe.ffn_layer}, {heads} | {row['batch']} "
            f"| {'full' if ac else 'no'} | {'yes' if row.get('fsdp') else 'no'} | {row['peak_memory_gib']:.1f} GiB "
            f"| {tensors[0]:.1f} / {tensors[1]:.1f} GiB | {row['peak_memory_gib'] / tensors[0]:.2f} / "
            f"{row['peak_memory_gib'] / tensors[1]:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """Samples this process's RSS every 0.2 ms in a thread and keeps the maximum."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0002)

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _measure_child(cfg: dict) -> dict:
    """Run in a fresh process: RSS held after the forward (what autograd keeps), the RSS peak of
    forward + backward, and the bytes of the tensors saved for backward (counted once per storage,
    parameters and images excluded)."""
    from dinoscale.models import attention
    from dinoscale.parallel import parallelize

    # The estimate models a fused attention kernel (what GPUs run: no N x N scores kept for the
    # backward); short fp32 sequences on CPU would take the matmul path, which keeps them.
    attention.CPU_FP32_MATMUL_MAX_TOKENS = 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vit.DinoVisionTransformer(
        img_size=GLOBAL_CROPS[1],
        patch_size=PATCH,
        embed_dim=cfg["dim"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        init_values=LAYERSCALE,
        ffn_layer=cfg["ffn_layer"],
    )
    if cfg["ac"]:
        parallelize(model, mesh=None, activation_checkpointing=cfg["ac"])
    B = cfg["batch"]
    crops = [torch.randn(B, 3, GLOBAL_CROPS[1], GLOBAL_CROPS[1]) for _ in range(GLOBAL_CROPS[0])]
    crops += [torch.randn(B, 3, LOCAL_CROPS[1], LOCAL_CROPS[1]) for _ in range(LOCAL_CROPS[0])]

    def step(hooks=None):
        if hooks is None:
            outs = model(crops, is_training=True)
        else:
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                outs = model(crops, is_training=True)
        return outs, sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in outs)

    # Warm-up step: one-time allocations (kernel caches, lazily built state) and the gradient
    # buffers exist before the measured step, so only activations and transients are counted.
    outs, loss = step()
    loss.backward()
    del outs, loss

    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    excluded |= {c.untyped_storage().data_ptr() for c in crops}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    before = _rss_bytes()
    with _PeakSampler() as sampler:
        outs, loss = step((pack, lambda t: t))
        after_forward = _rss_bytes()
        loss.backward()
    return {
        "held_after_forward": after_forward - before,
        "peak_increase": sampler.peak - before,
        # with AC the checkpoint's own hooks replace ours inside blocks, so only the no-AC count is meaningful
        "saved_for_backward": sum(saved.values()) if not cfg["ac"] else None,
    }


def measure(dim: int = 192, depth: int = 4, heads: int = 3, batch: int = 4, ffn_layer: str = "mlp", ac: bool = False) -> dict:
    """Measure a small fp32 model on CPU in a subprocess and compare with the same formula as
    :func:`estimate` (4 bytes per element instead of 2)."""
    cfg = dict(dim=dim, depth=depth, heads=heads, batch=batch, ffn_layer=ffn_layer, ac=ac)
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc return every large tensor to the OS when freed, so RSS
    # tracks live tensors (the default adaptive threshold would recycle freed heap silently).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run(
        [sys.executable, __file__, "--measure-child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    T = batch * tokens_per_image()[0]
    a = stored_per_token(dim, ffn_layer, 4 * dim)
    w = stored_per_block(dim, ffn_layer, 4 * dim)
    if ac:
        est_forward = depth * T * dim * 4
        est_peak = est_forward + (T * a + w) * 4
    else:
        est_forward = est_peak = depth * (T * a + w) * 4
    # outside the blocks only the final LayerNorm keeps its input
    est_forward += T * dim * 4
    est_peak += T * dim * 4
    return {**cfg, "tokens": T, "estimate_held": est_forward, "estimate_peak": est_peak, **measured}


def measurement_report() -> str:
    rows = [
        "| model (fp32, CPU) | AC | tokens | estimate held after forward | saved for backward (hooks) "
        "| RSS held after forward | estimate peak | RSS peak increase |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    MiB = 1024**2
    configs = [dict(ffn_layer=ffn, ac=ac) for ffn in ("mlp", "swiglufused") for ac in (False, True)]
    # ViT-g's width and heads (D=1536, SwiGLU), two blocks, one image: the formula at full width
    configs.append(dict(dim=1536, depth=2, heads=24, batch=1, ffn_layer="swiglufused", ac=False))
    for cfg in configs:
        r = measure(**cfg)
        saved = "-" if r["saved_for_backward"] is None else f"{r['saved_for_backward'] / MiB:.0f} MiB"
        rows.append(
            f"| D={r['dim']}, depth {r['depth']}, {r['ffn_layer']}, batch {r['batch']} "
            f"| {'yes' if r['ac'] else 'no'} | {r['tokens']:,} | {r['estimate_held'] / MiB:.0f} MiB | {saved} "
            f"| {r['held_after_forward'] / MiB:.0f} MiB | {r['estimate_peak'] / MiB:.0f} MiB "
            f"| {r['peak_increase'] / MiB:.0f} MiB |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory for the 'fits' column (GB)")
    parser.add_argument("--measure", action="store_true", help="also measure a small model on CPU")
    parser.add_argument("--configs", nargs="?", const=",".join(OWN_CONFIGS), default=None,
                        help=f"also a table of our configs (comma list; default {','.join(OWN_CONFIGS)}), each at "
                             "its batch and activation checkpointing")
    parser.add_argument("--against", metavar="STEP_JSONL", default=None,
                        help="the estimate of each bf16 GPU step in a train_step.py --json file, beside its peak")
    parser.add_argument("--measure-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_child:
        print(json.dumps(_measure_child(json.loads(args.measure_child))))
        return
    if args.gpu_gb <= 0:
        parser.error(f"--gpu-gb must be > 0, got {args.gpu_gb}")
    print(f"# Memory per GPU, DINOv2 recipe (2x{GLOBAL_CROPS[1]} + 8x{LOCAL_CROPS[1]} crops, patch {PATCH}), GiB\n")
    print(table(args.gpu_gb))
    print()
    for r in RECIPES:
        print(recipe_line(r))
    if args.configs:
        own = [config_recipe(name.strip()) for name in args.configs.split(",")]
        print(f"\n# Our configs, each at its batch and activation checkpointing, GiB\n")
        print(table(args.gpu_gb, [(r, (ac,)) for r, ac in own]))
        print()
        for r, _ac in own:
            print(recipe_line(r))
    if args.against:
        print(f"\n# Measured steps ({args.against}) against their estimate, GiB\n")
        print(against(args.against))
    if args.measure:
        print("\n# Activation model vs measurement (small model, CPU)\n")
        print(measurement_report())


if __name__ == "__main__":
    main()
