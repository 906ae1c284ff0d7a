"""Why the tensor implementation of the per-sample photometry costs what it costs: the machine's bandwidth in and
beyond its L2 cache, and the photometry's heaviest functions timed inside the multi-crop pipeline and alone.

    python benchmarks/photometry_memory.py                 # the photos of tools/bench_data.py, 4 passes
    python benchmarks/photometry_memory.py --passes 2 --photos 8 --reps 20

The tensor photometry (``dinoscale.data.transforms.photometric``, the accelerator path, and on the CPU with
``photometry_backend="torch"``; the default CPU path goes through OpenCV, ``photometric_cpu``, and calls none of the
functions timed here) is a chain of eager float32 tensor operations: each one reads and writes whole crops. Where those crops and their temporaries stay in the core's L2 cache, a pass runs
at the cache's bandwidth; where they do not, at what lies beyond it. Both parts run on one thread.

* Bandwidth: ``torch.add(a, b, out=c)`` (three streams) and ``a.mul_(s)`` (two), on float32 tensors a sixth of
  the L2 cache in size (read from sysfs; 1 MiB assumed where it is not there), cycling through buffers that in all
  fill half of L2 (one triple: "in L2") or 16 times L2 ("beyond L2"). Printed: microseconds per call and GB/s
  moved.
* The pipeline: ``MultiCropAugmentation(photometry_backend="torch")`` (per-sample tensor photometry, DINOv2's
  2 x 224 + 8 x 96 crops) on the JPEG photos ``tools/bench_data.py`` times, with three of the photometry's functions
  timed per call (``time.perf_counter``): the uint8 -> float conversion ``_planar_float``, the hue rotation
  ``_adjust_hue`` and the Gaussian blur ``_gaussian_blur``. The inputs of the first ``SAMPLED_CALLS`` calls of each function and input
  shape are kept (copies), and each of those calls is then repeated alone, back to back (operands in cache), median
  of ``--reps``. Printed per function and input shape: calls per image, and over the kept calls (the same inputs
  both ways: the blur's work depends on its sigma) the median microseconds per call inside the pipeline and alone,
  and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))

import dinoscale.data.transforms.photometric as photometric  # noqa: E402
from dinoscale.cpu_malloc import keep_freed_memory  # noqa: E402
from dinoscale.data.transforms.multicrop import MultiCropAugmentation  # noqa: E402

TIMED = ("_planar_float", "_adjust_hue", "_gaussian_blur")
# calls per function and input shape whose inputs are kept and replayed alone
SAMPLED_CALLS = 8
DEFAULT_L2_BYTES = 2**20


def l2_bytes() -> tuple[int, bool]:
    """(size of cpu0's L2 cache in bytes, whether sysfs said so); 1 MiB where sysfs has no level-2 entry."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip()
                scale = {"K": 2**10, "M": 2**20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * scale, True
        except (OSError, ValueError):
            continue
    return DEFAULT_L2_BYTES, False


def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def bandwidth(l2: int, reps: int) -> list[dict]:
    """us per call and GB/s of a 3-stream add and a 2-stream in-place multiply, working set in and beyond L2."""
    numel = l2 // 6 // 4  # float32 tensors of a sixth of L2: a triple fills half of it
    rows = []
    for name, total in (("in L2", l2 // 2), ("beyond L2", 16 * l2)):
        count = max(3, 3 * (total // (3 * numel * 4)))  # whole triples
        buffers = [torch.rand(numel) for _ in range(count)]
        factor = torch.tensor(1.0)  # multiplying by one keeps the values (and away from denormals)
        state = {"add": 0, "mul": 0}

        def add():
            k = state["add"]
            state["add"] = (k + 3) % count
            torch.add(buffers[k], buffers[k + 1], out=buffers[k + 2])

        def mul():
            k = state["mul"]
            state["mul"] = (k + 1) % count
            buffers[k].mul_(factor)

        for _ in range(2 * count):  # warm-up: every buffer touched
            add(), mul()
        add_us, mul_us = _median_us(add, reps * count // 3), _median_us(mul, reps * count // 3)
        rows.append({"working set": name, "bytes": count * numel * 4, "numel": numel, "add_us": add_us,
                     "add_gbs": 3 * numel * 4 / add_us / 1e3, "mul_us": mul_us, "mul_gbs": 2 * numel * 4 / mul_us / 1e3})
    return rows


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


@contextlib.contextmanager
def timers(calls: dict, sampled: dict):
    """While active, each function of ``TIMED`` in ``dinoscale.data.transforms.photometric`` counts its calls per
    (name, input shape) in ``calls`` and keeps, for the first ``SAMPLED_CALLS`` of them, copies of the inputs and the
    seconds the call took in ``sampled``; the functions are put back on exit."""
    originals = {name: getattr(photometric, name) for name in TIMED}

    def timed(name):
        fn = originals[name]

        def wrapper(*args, **kwargs):
            key = (name, tuple(args[0].shape))
            calls[key] = calls.get(key, 0) + 1
            keep = len(sampled.setdefault(key, [])) < SAMPLED_CALLS
            if keep:
                copies = (tuple(_copy(a) for a in args), {k: _copy(v) for k, v in kwargs.items()})
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - start
            if keep:
                sampled[key].append((*copies, seconds))
            return out

        return wrapper

    try:
        for name in TIMED:
            setattr(photometric, name, timed(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(photometric, name, fn)


def pipeline(photos: list[bytes], passes: int, reps: int) -> tuple[list[dict], float]:
    """Per (function, input shape): calls per image, and the median us per call inside the pipeline and alone over
    its sampled calls; and the pipeline's ms per image (timers included)."""
    augment = MultiCropAugmentation(photometry_backend="torch")
    for data in photos:  # warm-up, untimed
        augment(data)
    calls: dict[tuple, int] = {}
    sampled: dict[tuple, list[tuple]] = {}  # (args, kwargs, seconds inside) of the first calls
    with timers(calls, sampled):
        start = time.perf_counter()
        for _ in range(passes):
            for data in photos:
                augment(data)
        ms_per_image = (time.perf_counter() - start) / (passes * len(photos)) * 1e3
    rows = []
    with torch.inference_mode():
        for key in sorted(sampled, key=lambda k: (TIMED.index(k[0]), k[1])):
            fn, alone = getattr(photometric, key[0]), []
            for args, kwargs, _ in sampled[key]:
                if kwargs.get("out") is not None:  # the hue rotation in place, as in the pipeline
                    kwargs = dict(kwargs, out=args[0])
                alone.append(_median_us(lambda: fn(*args, **kwargs), reps))
            rows.append({"function": key[0], "shape": key[1], "calls_per_image": calls[key] / (passes * len(photos)),
                         "sampled": len(alone), "inside_us": statistics.median(c[2] for c in sampled[key]) * 1e6,
                         "alone_us": statistics.median(alone)})
    return rows, ms_per_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=4, help="timed passes over the photos")
    parser.add_argument("--photos", type=int, default=0, help="use the first N photos (0: all)")
    parser.add_argument("--reps", type=int, default=50, help="repetitions of each call alone, and bandwidth rounds")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the augmentation does in each loader worker
    torch.set_num_threads(1)
    torch.manual_seed(0)

    l2, from_sysfs = l2_bytes()
    print(f"L2 cache per core: {l2 // 1024} KiB ({'sysfs' if from_sysfs else 'assumed: sysfs has no L2 entry'}); "
          "one thread")
    rows = bandwidth(l2, args.reps)
    print(f"\nfloat32 tensors of {rows[0]['numel']} elements ({rows[0]['numel'] * 4 // 1024} KiB):")
    print(f"  {'working set':28s} {'add(out=) us':>12} {'GB/s':>7} {'mul_ us':>9} {'GB/s':>7}")
    for r in rows:
        label = f"{r['working set']} ({r['bytes'] / 2**20:.1f} MiB)"
        print(f"  {label:28s} {r['add_us']:12.1f} {r['add_gbs']:7.1f} {r['mul_us']:9.1f} {r['mul_gbs']:7.1f}")
    print(f"  beyond L2 / in L2, time per add: {rows[1]['add_us'] / rows[0]['add_us']:.2f}x")

    from bench_data import load_photos

    photos = [data for _, data in load_photos()]
    if args.photos:
        photos = photos[: args.photos]
    fn_rows, ms_per_image = pipeline(photos, args.passes, args.reps)
    print(f"\nper-sample tensor photometry in MultiCropAugmentation(photometry_backend=\"torch\"), {len(photos)} "
          f"photos x {args.passes} passes: "
          f"{ms_per_image:.2f} ms per image (with the timers)")
    print(f"  {'function':16s} {'input shape':18s} {'calls/image':>11} {'sampled':>7} {'inside us':>10} "
          f"{'alone us':>9} {'inside/alone':>12}")
    for r in fn_rows:
        shape = "x".join(str(s) for s in r["shape"])
        print(f"  {r['function']:16s} {shape:18s} {r['calls_per_image']:11.2f} {r['sampled']:7d} {r['inside_us']:10.1f} "
              f"{r['alone_us']:9.1f} {r['inside_us'] / r['alone_us']:11.2f}x")


if __name__ == "__main__":
    main()
