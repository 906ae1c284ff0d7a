"""Data-parallel scaling on CPU: the same global batch on 1 process or on 2 processes (gloo, FSDP2).

    python benchmarks/scaling_cpu.py                        # quickstart, global batch 64, bf16 autocast
    python benchmarks/scaling_cpu.py --global-batch 128 --autocast none --steps 5

Three runs of the full training step (``benchmarks/train_step.py``: forward, backward, clipping, AdamW, EMA;
data loading not timed) on the same global batch:

  A. 1 process  x 1 thread                 the per-core baseline
  B. 1 process  x N threads  (N = cores)   intra-op parallelism (OpenMP inside each kernel)
  C. N processes x 1 thread, gloo           data parallelism: each rank holds 1/N of the batch; student and
                                            teacher are sharded with FSDP2 by the loop's ``apply_parallelism``
                                            (parameters all-gathered per block, gradients reduce-scattered)

On a machine with few cores (the development box has 2) the processes share the cores with each other and
with the gloo transport, so C measures the cost of sharding and communication, not a multi-node speed-up.
Printed: global images/s of each run, the scaling efficiency of C against ideal (``C / (N * A)``) and the
ratio of the two ways to use the N cores (``C / B``). FSDP keeps parameters in fp32 here
(``compute.param_dtype=fp32``) so that all runs do the same arithmetic; ``--autocast`` applies to all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import train_step  # noqa: E402  (also puts the repository on sys.path)

from dinoscale import distributed  # noqa: E402


def _measure(config: str, overrides: list[str], per_rank_batch: int, variant: str, steps: int, warmup: int,
             rank: int = 0) -> dict:
    run, flops, _ = train_step.build_step(config, overrides, per_rank_batch, variant, batch_seed=rank)
    for _ in range(warmup):
        run()
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    distributed.barrier()  # the slowest rank decides
    return {"seconds_per_step": (time.perf_counter() - start) / steps, "flops_per_rank_step": flops}


def _worker(rank: int, world_size: int, port: int, out_dir: str, args: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    distributed.init_distributed(backend="gloo", arrival_timeout_s=120)
    try:
        result = _measure(args["config"], args["overrides"], args["global_batch"] // world_size, args["variant"],
                          args["steps"], args["warmup"], rank)
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(result))
    finally:
        distributed.destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", choices=sorted(train_step.CONFIGS))
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--autocast", default="bf16", choices=("bf16", "none"))
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.processes < 2:
        parser.error("--processes must be >= 2")
    if args.global_batch % args.processes:
        parser.error(f"--global-batch {args.global_batch} is not divisible by {args.processes} processes")
    config, overrides, _ = train_step.CONFIGS[args.config]
    overrides = [*overrides, "compute.param_dtype=fp32", "compute.reduce_dtype=fp32"]
    variant = f"{'bf16' if args.autocast == 'bf16' else 'fp32'}-eager"
    n = args.processes
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, config {args.config}, "
          f"global batch {args.global_batch}, autocast {args.autocast}")

    results = {}
    for label, threads in (("A  1 process  x 1 thread ", 1), (f"B  1 process  x {n} threads", n)):
        torch.set_num_threads(threads)
        results[label] = _measure(config, overrides, args.global_batch, variant, args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        job = {"config": config, "overrides": overrides, "global_batch": args.global_batch, "variant": variant,
               "steps": args.steps, "warmup": args.warmup}
        mp.spawn(_worker, args=(n, distributed.find_free_port(), tmp, job), nprocs=n)
        results[f"C  {n} processes x 1 thread (FSDP2, gloo)"] = json.loads(Path(tmp, "result.json").read_text())

    rates = {}
    for label, r in results.items():
        rates[label] = args.global_batch / r["seconds_per_step"]
        print(f"{label:42} {rates[label]:8.2f} img/s   {r['seconds_per_step']:7.3f} s/step")
    a, b, c = rates.values()
    print(f"scaling efficiency C / ({n} x A): {c / (n * a):.1%}")
    print(f"processes vs threads   C / B:     {c / b:.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
