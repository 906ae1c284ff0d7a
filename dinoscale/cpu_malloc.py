"""Keep freed tensor memory in the process on CPU (glibc), so steps do not pay page faults for it.

PyTorch's CPU tensors come from ``malloc``. glibc hands large blocks back to the kernel when they are
freed (``munmap``, or trimming the top of the heap), and the next step's tensors of the same sizes fault
in fresh, zero-filled pages again. For our ViT-S/14 multi-crop forward and backward in fp32 that was
about 48,000 minor page faults per step (~190 MiB of pages zero-filled anew), and the step took 5% longer
than after :func:`keep_freed_memory`, which brings the faults to 0 (``benchmarks/backbone_vs_timm.py``).

Two glibc settings do it: blocks up to 32 MiB come from the heap instead of a fresh mapping each, and
the heap keeps 256 MiB of free space at its top when it shrinks (``M_TOP_PAD``). (Raising only the trim
threshold does not help: any explicit setting also freezes glibc's adaptive mmap threshold at 128 KiB,
so every large tensor would be mapped anew.) The cost is resident memory: up to ``top_pad`` bytes of
freed memory stay with the process, for the next step to reuse. Only glibc has ``mallopt``; elsewhere
(musl, macOS) this is a no-op that returns False. Training calls it when it runs on the CPU, the
multi-crop augmentation in each process that runs it (data-loader workers: DINOv2's 2 + 8 crops of
skimage's astronaut photo take 3.8 ms of CPU per image with it, 4.8-5.0 ms with glibc's defaults and
4.7-4.8 ms with the augmentation's earlier setting of a 16 MiB mmap and 64 MiB trim threshold), and the
CPU benchmarks; ``DINOSCALE_KEEP_MALLOC=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's <malloc.h>
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc's upper bound for M_MMAP_THRESHOLD on 64-bit systems (HEAP_MAX_SIZE / 2): larger blocks are always mapped
MAX_MMAP_THRESHOLD = 32 * 2**20
ENV_VAR = "DINOSCALE_KEEP_MALLOC"

_applied: bool | None = None


def keep_freed_memory(top_pad: int = 256 * 2**20, mmap_threshold: int = MAX_MMAP_THRESHOLD) -> bool:
    """Ask glibc to keep freed blocks for reuse instead of returning them to the kernel; True if it did.

    Blocks up to ``mmap_threshold`` bytes come from the heap (not a fresh mapping each), and the heap
    keeps ``top_pad`` bytes of free space when it grows or shrinks. Process-wide and idempotent.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        _applied = False
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (no mallopt), or no C library found
        _applied = False
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TOP_PAD, int(top_pad)) == 1 and ok
    _applied = ok
    return _applied
