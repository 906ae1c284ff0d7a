"""This machine's matmul peak, the MFU denominator of the CPU benchmarks: bf16 and fp32.

    python benchmarks/peak.py

Calls ``dinoscale.train.perf.peak.peak_flops("cpu", dtype, refresh=True)`` for each dtype: a 2048^3 matmul, best
of 10, with torch's thread count; the larger of this probe and the figure cached for this CPU model, thread
count and dtype (``~/.cache/dinoscale/peak_flops.json``) is printed and kept, and the source line says which.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dinoscale.train.perf.peak import peak_flops  # noqa: E402


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    values = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        values[name], source = peak_flops("cpu", dtype, refresh=True)
        print(f"{name}: {values[name] / 1e9:.0f} GFLOP/s ({source})", flush=True)
    print(f"bf16 / fp32: {values['bf16'] / values['fp32']:.1f}x")


if __name__ == "__main__":
    main()
