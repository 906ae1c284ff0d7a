"""Devices, autocast and dtype names: the one place that turns the config's strings into torch objects.

``train.device`` / ``--device``: ``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
``train.autocast``: ``auto`` (bf16 on CUDA, off on CPU), ``none``, ``bf16``, ``fp16``.
Evaluation picks its own default (``inference_autocast_dtype``): bf16 wherever the hardware has bf16 matmuls.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any, Optional

import torch

# Every spelling a config or a command line may use, to its dtype.
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "none": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_from_name(name: str, *, what: str = "dtype") -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; ``what`` names the option in the error."""
    key = str(name).lower()
    if key not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (fp32, bf16, fp16 only)."""
    if dtype not in _SHORT_NAMES:
        raise ValueError(f"dtype must be one of {list(_SHORT_NAMES)}, got {dtype}")
    return _SHORT_NAMES[dtype]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the current CUDA device when there is one, else the CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' requested but no CUDA device is available; use cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    capability = ""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    if "AMX" in capability.upper():
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def training_autocast_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """``train.autocast`` -> the autocast dtype, or None for none (full precision)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return None
    if mode not in ("bf16", "fp16"):
        raise ValueError(f"train.autocast must be auto, none, bf16 or fp16, got '{mode}'")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("train.autocast=fp16 needs CUDA (fp16 training needs a loss scaler; use bf16 on CPU)")
    return DTYPES[mode]


def inference_autocast_dtype(device: torch.device, autocast_dtype: Any = None) -> Optional[torch.dtype]:
    """Autocast dtype for feature extraction, or None for full fp32.

    ``None`` picks the default: bf16 on a CPU with native bf16 support, fp32 on other CPUs,
    bf16 on CUDA when supported else fp16. An explicit dtype (or "bf16"/"fp16"/"fp32")
    overrides; fp32 disables autocast.
    """
    if isinstance(autocast_dtype, str):
        autocast_dtype = dtype_from_name(autocast_dtype, what="autocast dtype")
    if autocast_dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if cpu_supports_bf16() else None
        return None
    if autocast_dtype not in _SHORT_NAMES:
        raise ValueError(f"autocast dtype must be float32, bfloat16 or float16, got {autocast_dtype}")
    return None if autocast_dtype == torch.float32 else autocast_dtype


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for full precision (None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
