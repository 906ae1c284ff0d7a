"""Full DINOv2 training-step throughput: images/s and MFU, fp32 vs bf16, eager vs compiled blocks.

    python benchmarks/train_step.py                                  # CPU: quickstart and ViT-S/14, all variants
    python benchmarks/train_step.py --configs quickstart --batch 64 --steps 5
    python benchmarks/train_step.py --configs vits14 --variants bf16-eager,bf16-compiled
    python benchmarks/train_step.py --device cuda --configs vitl14 --variants bf16-eager,bf16-compiled \
        --json results.jsonl                                         # GPU (benchmarks/gpu.sh); + peak memory
    python benchmarks/train_step.py --device cuda --configs vitg14 --variants bf16-eager --fsdp --steps 3
                                                                     # ViT-g/14 recipe, FSDP2 + AC: memory
    python benchmarks/train_step.py --configs vits14 --variants fp32-eager --ac none,full,selective
                                                                     # activation checkpointing: memory, time

``--ac`` sets ``compute.activation_checkpointing`` (none | full | selective) for each row instead of the config's.
On CUDA the peak memory is ``torch.cuda.max_memory_allocated()`` over the timed steps. On CPU, with ``--ac``, every
row runs in a fresh process and its peak memory is the rise of the process's resident high-water mark (``VmHWM``)
over the warm-up and timed steps, from where it stood once the networks and the batch were built: activations,
gradients and the AdamW states (the same in every mode), and what the allocator keeps.

A step is what ``dinoscale.train.step.train_step`` does between two batches, less its skip of non-finite steps:
the method's forward under the configured autocast (student on all crops, EMA teacher on the global crops,
DINO/iBOT heads and losses), backward, gradient clipping, AdamW step and the EMA update. It is built from
training's own functions (``dinoscale.train.build.apply_parallelism``, ``build_optimizer``,
``dinoscale.device.autocast``, ``ema_update_``). Data loading is *not* timed: batches are made once by the
method's own transform and collate (``dinoscale.train.perf.flops.example_batch``) and reused, so the figure is the
compute ceiling of the step.

FLOPs per step come from ``dinoscale.train.perf.flops.step_flops`` (fvcore; 1 multiply-add = 2 FLOPs, backward = 2 x
forward); MFU is relative to ``dinoscale.train.perf.peak.peak_flops`` for the variant's dtype: the measured matmul
peak of this CPU (``--refresh-peak`` measures again), or the data-sheet figure of a known GPU. On CUDA the
timed steps end with a device synchronisation, and the peak allocated memory of the timed steps is reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dinoscale.config import load_config  # noqa: E402
from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.device import autocast as autocast_in, training_autocast_dtype  # noqa: E402
from dinoscale.methods.registry import build_method  # noqa: E402
from dinoscale.parallel import AC_MODES  # noqa: E402
from dinoscale.train.perf.flops import example_batch, step_flops  # noqa: E402
from dinoscale.train.perf.peak import peak_flops  # noqa: E402
from dinoscale.train.build import apply_parallelism  # noqa: E402
from dinoscale.train.optim import apply_schedule_, build_optimizer, clip_grad_norm_, get_param_groups  # noqa: E402
from dinoscale.train.teacher import ema_update_, init_teacher_from_student_  # noqa: E402

# name -> (config, overrides, default images per step)
CONFIGS = {
    "quickstart": ("quickstart", [], 128),
    # the released ViT-S/14 recipe (2 x 224 + 8 x 98 crops, 65536 prototypes), a small batch
    "vits14": ("train/vits14", ["model.drop_path_rate=0.1"], 4),
    # our ViT-L/14 config (MLP, one shared 65536-prototype head) at batch 32 without activation checkpointing, so
    # no recomputation hides in the figures: it fits 80 GB (memory_estimate.py --against: 33.4 GiB of tensors)
    "vitl14": ("train/vitl14", ["compute.activation_checkpointing=false"], 32),
    # ViT-g/14 with its recipe unchanged (batch 12 per GPU, activation checkpointing, 131072-prototype
    # heads): run with --fsdp to measure the memory of the sharded step (docs/scaling.md's estimate)
    "vitg14": ("train/vitg14", [], 12),
}
VARIANTS = ("fp32-eager", "bf16-eager", "fp32-compiled", "bf16-compiled")


def build_step(config: str, overrides: list[str], batch_size: int, variant: str, *, batch_seed: int = 0,
               device: str = "cpu", ac: str | None = None):
    """(run one step, flops per step, images per step) for a config and a variant.

    ``batch_size`` is per process. Under a process group ``apply_parallelism`` shards with FSDP2 as in the
    loop (every rank must call this: building the mesh and sharding are collective). ``ac``: the activation
    checkpointing mode (none | full | selective); None keeps the config's.
    """
    dtype, mode = variant.split("-")
    # Compiled graphs of earlier variants count against dynamo's per-function recompile limit: start afresh.
    torch._dynamo.reset()
    cfg = load_config(config, [
        *overrides,
        f"train.batch_size_per_rank={batch_size}",
        f"train.autocast={'bf16' if dtype == 'bf16' else 'none'}",
        f"compute.compile={'true' if mode == 'compiled' else 'false'}",
        f"train.device={device}",
        *([f"compute.activation_checkpointing={ac}"] if ac is not None else []),
    ])
    dev = torch.device(device)
    torch.manual_seed(0)
    method = build_method(cfg).to(dev)
    student, teacher = method.build_networks()
    if teacher is not None:
        init_teacher_from_student_(teacher, student)
        teacher.to(dev)
    student.to(dev)
    patch = student["backbone"].patch_size
    batch = example_batch(method, patch, batch_size, image_size=max(256, cfg.crops.global_crops_size),
                          seed=batch_seed, device=dev)
    flops = step_flops(method, student, teacher, batch)  # before compile: counted on the plain networks
    apply_parallelism(cfg.compute, student, teacher)
    optimizer = build_optimizer(get_param_groups(student, lr_decay_rate=cfg.optim.layerwise_decay,
                                                 patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
                                                 n_blocks=student["backbone"].n_blocks))
    apply_schedule_(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    autocast = functools.partial(autocast_in, dev, training_autocast_dtype(cfg.train.autocast, dev))
    sched = {"teacher_temp": cfg.teacher.teacher_temp, "momentum": cfg.teacher.momentum_teacher}
    student.train()
    if teacher is not None:
        teacher.eval()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, _terms = method(student, teacher, batch, sched)
        loss.backward()
        clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        if teacher is not None:
            ema_update_(teacher, student, sched["momentum"])

    return run, flops, batch_size


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure_row(name: str, variant: str, ac: str | None, *, batch: int | None, steps: int, warmup: int,
                device: torch.device, cpu_memory: bool = False) -> dict:
    """Build the step and time it: step times (s), FLOPs and images per step, peak memory (bytes; None when not
    measured: on CPU only with ``cpu_memory``, which needs a fresh process)."""
    config, overrides, default_batch = CONFIGS[name]
    run, flops, images = build_step(config, overrides, batch or default_batch, variant, device=str(device), ac=ac)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start_rss = _rss_bytes()
    for _ in range(warmup):
        run()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    memory = None
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    elif cpu_memory:
        memory = _peak_rss_bytes() - start_rss
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"times": times, "flops": flops, "images": images, "memory": memory}


def _row_in_child(name: str, variant: str, ac: str | None, args) -> dict:
    """:func:`measure_row` in a fresh Python process (its own resident high-water mark)."""
    spec = {"name": name, "variant": variant, "ac": ac, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "threads": torch.get_num_threads()}
    out = subprocess.run([sys.executable, __file__, "--child-row", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the measurement of {name} {variant} ac={ac} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_row(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    keep_freed_memory()
    row = measure_row(spec["name"], spec["variant"], spec["ac"], batch=spec["batch"], steps=spec["steps"],
                      warmup=spec["warmup"], device=torch.device("cpu"), cpu_memory=True)
    print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="quickstart,vits14", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    parser.add_argument("--ac", default=None,
                        help=f"comma list of activation checkpointing modes {AC_MODES} (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: per config)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--refresh-peak", action="store_true", help="measure the matmul peak again")
    parser.add_argument("--json", default=None, help="also append one JSON line per result to this file")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard with FSDP2 over a one-process group, as training does (bf16 params, fp32 "
                             "reduce); on one device this changes the memory layout and kernels, not the state size")
    parser.add_argument("--child-row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_row:
        _child_row(json.loads(args.child_row))
        return
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    ac_modes = args.ac.split(",") if args.ac else [None]
    for mode in ac_modes:
        if mode is not None and mode not in AC_MODES:
            parser.error(f"unknown --ac mode {mode!r}; choose from {AC_MODES}")
    if args.ac and args.fsdp and args.device == "cpu":
        parser.error("--ac on CPU measures each row in a fresh process, which --fsdp's process group does not reach")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()  # as the training loop does on CPU
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.fsdp:
        from dinoscale import distributed

        port = distributed.find_free_port()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        distributed.init_distributed()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        peaks[dtype] = peak_flops(device, dtype, refresh=args.refresh_peak)
    print(f"torch {torch.__version__}, {where}, fsdp {args.fsdp}, load {os.getloadavg()[0]:.2f}")
    for dtype, (value, source) in peaks.items():
        print(f"peak {dtype}: {value / 1e9:.1f} GFLOP/s ({source})")
    print(f"{'config':10} {'variant':14} {'AC':9} {'batch':>5} {'GFLOP/step':>10} {'s/step':>6} {'img/s':>15} "
          f"{'GFLOP/s':>15} {'MFU':>13} {'peak mem':>10}  (median / best)")
    for name in args.configs.split(","):
        for variant in args.variants.split(","):
            for ac in ac_modes:
                if device.type == "cpu" and args.ac:
                    row = _row_in_child(name, variant, ac, args)
                else:
                    row = measure_row(name, variant, ac, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                      device=device)
                flops, images, memory = row["flops"], row["images"], row["memory"]
                median, best = statistics.median(row["times"]), min(row["times"])
                peak = peaks[torch.bfloat16 if variant.startswith("bf16") else torch.float32][0]
                memory_gib = None if memory is None else memory / 2**30
                print(f"{name:10} {variant:14} {ac or 'config':9} {images:5d} {flops / 1e9:10.1f} {median:6.2f} "
                      f"{images / median:7.2f} / {images / best:5.2f} "
                      f"{flops / median / 1e9:7.1f} / {flops / best / 1e9:5.1f} "
                      f"{flops / median / peak:6.1%} / {flops / best / peak:5.1%} "
                      f"{'-' if memory_gib is None else f'{memory_gib:6.2f} GiB':>10}", flush=True)
                if args.json:
                    result = {"config": name, "variant": variant, "ac": ac, "fsdp": args.fsdp, "device": where,
                              "batch": images, "gflop_per_step": flops / 1e9, "s_step_median": median,
                              "img_s_median": images / median, "img_s_best": images / best,
                              "mfu_median": flops / median / peak, "peak_flops": peak,
                              "peak_memory_gib": memory_gib, "steps": args.steps, "torch": torch.__version__,
                              "attn_env": os.environ.get("DINOSCALE_ATTN"), "time": time.time()}
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps(result) + "\n")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.fsdp:
        distributed.destroy_distributed()


if __name__ == "__main__":
    main()
