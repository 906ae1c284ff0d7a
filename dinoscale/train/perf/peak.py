"""The hardware's peak dense matmul FLOP/s, the denominator of MFU.

Known GPUs come from a table of data-sheet figures (``GPU_PEAK_FLOPS``); anything else, CPUs included, is
measured with a square matmul and cached in a JSON file per machine (CPU model or GPU name, thread count,
dtype). The cache keeps the best figure ever measured: a probe on a busy machine only ever comes out too low (a
2-thread bf16 probe taken under load once read 0.25 TFLOP/s on a machine whose idle peak is 2.4, and every
later MFU was ten times too high), so a new probe may raise the figure but never lowers it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from dinoscale.device import dtype_name as short_dtype_name

__all__ = ["GPU_PEAK_FLOPS", "default_cache_path", "peak_flops"]

# Dense (no sparsity) tensor-core figures from NVIDIA's data sheets, FLOP/s. "tf32" is used for float32
# when TF32 matmuls are allowed (torch.backends.cuda.matmul), "fp32" otherwise. Matched in order, so more
# specific names come first.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM (HBM3)
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("A40", {"bf16": 149.7e12, "fp16": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores: bf16 is measured
]

_PROBE_SIZE = {"cpu": 2048, "cuda": 8192}
_PROBE_REPEATS = 10  # best of 10: a shared machine rarely slows every run


def default_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoscale" / "peak_flops.json"


def _gpu_table_entry(name: str, dtype_name: str) -> tuple[float, str] | None:
    if dtype_name == "fp32" and torch.get_float32_matmul_precision() != "highest":
        dtype_name = "tf32"
    for pattern, figures in GPU_PEAK_FLOPS:
        # word match, so that "A100" is not taken for "A10" and "L40S" not for "L4"
        tokens = name.replace("-", " ").split()
        words = pattern.split()
        if any(tokens[i : i + len(words)] == words for i in range(len(tokens))) and dtype_name in figures:
            return figures[dtype_name], f"table: {name}, dense {dtype_name}"
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul over ``repeats`` timed runs (after one warm-up)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: ranks probing at once never leave a half-written file


def peak_flops(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    cache_path: str | os.PathLike | None = None,
    refresh: bool = False,
) -> tuple[float, str]:
    """Peak dense matmul FLOP/s of ``device`` for ``dtype``, and where the figure comes from.

    Known GPUs (by ``torch.cuda.get_device_name``) come from ``GPU_PEAK_FLOPS``. Anything else -- CPUs
    included -- is measured once with a square matmul (2048 on CPU, 8192 on GPU; best of 10) and cached in
    ``cache_path`` (default ``~/.cache/dinoscale/peak_flops.json``) under the CPU model (or GPU name), the
    thread count and the dtype. ``refresh=True`` measures again; the larger of that probe and the cached figure
    is returned and kept.
    """
    device = torch.device(device)
    try:
        dtype_name = short_dtype_name(dtype)
    except ValueError as e:
        raise ValueError(f"peak_flops: {e}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = _gpu_table_entry(name, dtype_name)
        if entry is not None:
            return entry
        key = f"cuda|{name}|{dtype_name}"
    elif device.type == "cpu":
        key = f"cpu|{_cpu_model()}|threads={torch.get_num_threads()}|{dtype_name}"
    else:
        raise ValueError(f"peak_flops: unsupported device type '{device.type}' (cpu or cuda)")
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    cache = _read_cache(path)
    if not refresh and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key]), f"measured (cached in {path}): {key}"
    n = _PROBE_SIZE[device.type]
    measured = _measure_matmul(device, dtype, n, _PROBE_REPEATS)
    cache = _read_cache(path)  # another process may have written meanwhile
    before = cache.get(key)
    best = max(measured, float(before)) if isinstance(before, (int, float)) and before > 0 else measured
    if best != before:
        cache[key] = best
        _write_cache(path, cache)
    return best, (
        f"measured now ({n}^3 matmul, best of {_PROBE_REPEATS}: {measured:.4g}; the best on this machine is kept "
        f"in {path}): {key}"
    )
