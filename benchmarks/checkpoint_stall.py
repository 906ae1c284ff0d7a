"""How long a checkpoint holds training up: synchronous vs background (``train.async_checkpoint``) saving.

    python benchmarks/checkpoint_stall.py                        # quickstart and ViT-S/14, 40 steps, every 10
    python benchmarks/checkpoint_stall.py --configs vits14 --steps 60 --md benchmarks/checkpoint_stall.md

Each run is ``dinoscale.train.loop.train`` itself, single process, with ``train.checkpoint_every`` (10), in a fresh
output directory. The loop's ``train_step`` and ``save_run`` are wrapped to take the time: an *iteration* is
from the start of one step to the start of the next, so it holds the step, its logging and the checkpoint saved
after it. Reported per run:

* median iteration: over the iterations that are neither a checkpoint's nor the one after it (nor the first two);
* longest around a checkpoint: the longest iteration of a checkpoint step or the step after it (a background
  write competes with that step for the CPU and the disk);
* longest blocked in save: the longest time the loop spent inside ``save_run`` (synchronous: the whole write;
  background: waiting for the previous save, and the copy to CPU memory);
* total: ``train()`` from call to return, the last checkpoint's completion included.

Configs: ``quickstart`` (configs/quickstart.yaml as it is, reading Fashion-MNIST's files directly instead of
building shards first) and ``vits14`` (configs/train/vits14.yaml: ViT-S/14 with its 65536-prototype heads, about
44 M student parameters, so a checkpoint of student, teacher and AdamW states is about 0.7 GB; on 56 px global
and 28 px local crops of Fashion-MNIST, batch 4, fp32, so a step takes a fraction of a second on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dinoscale import checkpoint  # noqa: E402
from dinoscale.config import load_config  # noqa: E402
from dinoscale.train import loop  # noqa: E402

_DATA = ["train.dataset=fashion-mnist:train", "train.build_shards_from=null"]
_QUIET = ["evaluation.final_knn=false", "train.tensorboard=false", "train.log_throughput=false",
          "train.resume=false"]
# name -> (config, overrides)
CONFIGS = {
    "quickstart": ("quickstart", [*_DATA]),
    "vits14": ("train/vits14", [*_DATA, "train.batch_size_per_rank=4", "train.num_workers=1",
                                "crops.global_crops_size=56", "crops.local_crops_size=28", "train.autocast=none",
                                "model.drop_path_rate=0.0"]),
}


def timed_run(config: str, overrides: list[str], output_dir: Path, *, background: bool, steps: int, every: int,
              log_every: int = 10) -> dict:
    """One training run; its iteration times, its time inside ``save_run`` and its checkpoint size."""
    cfg = load_config(config, [*overrides, *_QUIET, f"train.output_dir={output_dir}", f"train.max_steps={steps}",
                               f"train.checkpoint_every={every}", f"train.log_every={log_every}",
                               f"train.async_checkpoint={'true' if background else 'false'}"])
    starts: list[float] = []
    in_save: dict[int, float] = {}
    real_step, real_save = loop.train_step, loop.save_run

    def step(*args, **kwargs):
        starts.append(time.perf_counter())
        return real_step(*args, **kwargs)

    def save(run, step_, **kwargs):
        started = time.perf_counter()
        real_save(run, step_, **kwargs)
        in_save[step_] = time.perf_counter() - started

    loop.train_step, loop.save_run = step, save
    try:
        started = time.perf_counter()
        result = loop.train(cfg)
        total = time.perf_counter() - started
    finally:
        loop.train_step, loop.save_run = real_step, real_save
    assert result.step == steps, result
    # iteration k (k = 1 .. steps-1): step k, its logging and the checkpoint after it
    iterations = {k: starts[k] - starts[k - 1] for k in range(1, len(starts))}
    ckpt_steps = {k for k in iterations if k % every == 0}
    around = {k for k in iterations if k in ckpt_steps or k - 1 in ckpt_steps}
    plain = [t for k, t in iterations.items() if k not in around and k > 2]
    latest = checkpoint.latest_checkpoint(output_dir)
    size = sum(f.stat().st_size for f in latest.iterdir())
    return {"median": statistics.median(plain) if plain else float("nan"),
            "longest_around": max((iterations[k] for k in around), default=float("nan")),
            "longest_in_save": max((t for k, t in in_save.items() if k < steps), default=float("nan")),
            "final_save": in_save.get(steps, float("nan")), "total": total, "bytes": size,
            "checkpoints": len(in_save)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="quickstart,vits14", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="train.checkpoint_every")
    parser.add_argument("--out", default=None, help="where the runs write (default: a temporary directory)")
    parser.add_argument("--md", default=None, help="also write the table, with this command, to this file")
    parser.add_argument("--extra", nargs="*", default=[], help="config overrides for every run")
    args = parser.parse_args(argv)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {sorted(CONFIGS)}")
    if args.steps < 2 * args.every:
        parser.error("--steps must be at least 2 x --every (a checkpoint between plain steps)")
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
            f"{args.steps} steps, a checkpoint every {args.every}")
    lines = ["| config | saving | checkpoint | median iteration | longest around a checkpoint "
             "| longest blocked in save | final save | total |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    print(head)
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="checkpoint_stall_") as tmp:
        root = Path(args.out or tmp)
        for name in args.configs.split(","):
            config, overrides = CONFIGS[name]
            for background in (False, True):
                mode = "background" if background else "sync"
                r = timed_run(config, [*overrides, *args.extra], root / f"{name}_{mode}", background=background,
                              steps=args.steps, every=args.every)
                line = (f"| {name} | {mode} | {r['bytes'] / 2**20:,.0f} MiB | {r['median']:.3f} s "
                        f"| {r['longest_around']:.3f} s | {r['longest_in_save']:.3f} s | {r['final_save']:.3f} s "
                        f"| {r['total']:.1f} s |")
                lines.append(line)
                print(line, flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.md:
        command = "python benchmarks/checkpoint_stall.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.md).write_text(f"# Checkpoint stall: synchronous vs background saving\n\n`{command.strip()}`\n\n"
                                 f"{head}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
