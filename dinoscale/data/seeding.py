"""Seeds: how every random draw of the data pipeline is derived from the run's seed.

A sample's augmentation, a step's collate and a shard stream's order are seeded from the run's ``seed``
and their position (see :mod:`dinoscale.data.steps` and :mod:`dinoscale.data.streams`), so a batch is a
pure function of the seed, the step and the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (e.g. ``(seed, "augment", position)``).

    Hash-based, so nearby inputs give unrelated seeds and the result is the same on every
    machine and Python run (unlike ``hash()``).
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def run_seeded(seed: int, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with torch's global CPU RNG seeded by ``seed``; the caller's RNG state is restored.

    Only the CPU generator is seeded: ``torch.manual_seed`` would also queue a seed for every accelerator
    backend (capturing a Python stack for each, about 1 ms a call, once per sample) and, in a training process
    that loads its own data, reseed its CUDA generator with every sample.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn(*args, **kwargs)
