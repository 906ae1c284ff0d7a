"""Minor page faults per training step on CPU, with and without ``dinoscale.cpu_malloc.keep_freed_memory``.

    python benchmarks/page_faults.py                          # fp32, 3 processes per setting, 5 steps each
    python benchmarks/page_faults.py --processes 5 --dtype bf16

glibc hands large freed blocks back to the kernel (``munmap``, heap trimming), and the next step's tensors of
the same sizes fault in fresh, zero-filled pages again. Whether it trims depends on the address-space layout
ASLR draws for the process, so the figure varies from process to process: each setting runs in
``--processes`` fresh processes. In each, ``backbone_vs_timm.py``'s step (its functions are imported: ViT-S/14,
``2B`` 224 px + ``8B`` 98 px crops, forward and backward) runs for ours and for timm, interleaved, after
``--warmup`` untimed steps each, and every timed step records ``resource.getrusage(RUSAGE_SELF).ru_minflt``
before and after it, and its time.

Settings: ``DINOSCALE_KEEP_MALLOC=0`` (glibc's defaults) and ``=1`` (``keep_freed_memory()``, what training and
the CPU benchmarks do). Printed per process: the median minor faults per step and the median seconds per step
of each model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(batch: int, steps: int, warmup: int, dtype: str, threads: int | None) -> dict:
    """In this process: faults and seconds per step of ours and timm (``keep_freed_memory`` as the environment says)."""
    import torch

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from backbone_vs_timm import autocast_for, build_models, loss_ours, loss_timm, make_batch, step

    from dinoscale.cpu_malloc import keep_freed_memory

    kept = keep_freed_memory()  # a no-op returning False under DINOSCALE_KEEP_MALLOC=0
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours, theirs = build_models(None)
    crops = make_batch(batch)
    autocast = autocast_for(dtype)
    runs = {"ours": (ours, loss_ours), "timm": (theirs, loss_timm)}
    for _ in range(warmup):
        for model, fn in runs.values():
            step(model, fn, crops, autocast)
    faults = {name: [] for name in runs}
    seconds = {name: [] for name in runs}
    for i in range(steps):
        for name in (list(runs) if i % 2 == 0 else list(reversed(runs))):
            model, fn = runs[name]
            before = _minflt()
            seconds[name].append(step(model, fn, crops, autocast))
            faults[name].append(_minflt() - before)
    return {"keep_freed_memory": kept, "threads": torch.get_num_threads(), "faults": faults, "seconds": seconds}


def run_process(keep: bool, args) -> dict:
    """:func:`measure` in a fresh Python process with ``DINOSCALE_KEEP_MALLOC`` set to ``keep``."""
    spec = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
            "threads": args.threads}
    env = {**os.environ, "DINOSCALE_KEEP_MALLOC": "1" if keep else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the measurement with DINOSCALE_KEEP_MALLOC={int(keep)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="source images per step (2B + 8B crops)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting (ASLR differs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["batch"], spec["steps"], spec["warmup"], spec["dtype"], spec["threads"])))
        return
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.processes < 1:
        parser.error("--batch, --steps and --processes must be >= 1, --warmup >= 0")
    print(f"ViT-S/14 multi-crop step (backbone_vs_timm.py), {args.dtype}, batch {args.batch}, {args.steps} timed steps "
          f"per model after {args.warmup}, {args.processes} processes per setting, load {os.getloadavg()[0]:.2f}")
    print(f"{'DINOSCALE_KEEP_MALLOC':21} {'process':>7} {'applied':>7}  {'ours faults/step':>16} "
          f"{'timm faults/step':>16}  {'ours s/step':>11} {'timm s/step':>11}  (medians)")
    start = time.perf_counter()
    for keep in (False, True):
        for p in range(args.processes):
            r = run_process(keep, args)
            f = {k: statistics.median(v) for k, v in r["faults"].items()}
            s = {k: statistics.median(v) for k, v in r["seconds"].items()}
            print(f"{int(keep):<21} {p + 1:>7} {str(r['keep_freed_memory']):>7}  "
                  f"{f['ours']:16,.0f} {f['timm']:16,.0f}  "
                  f"{s['ours']:11.3f} {s['timm']:11.3f}", flush=True)
    print(f"threads per process: {r['threads']}; {time.perf_counter() - start:.0f} s in all; "
          f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
