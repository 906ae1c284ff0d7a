"""The resumable pretraining data loader: ``build_pretrain_loader(...)`` -> an infinite iterator of batches.

Position model
--------------
Every batch is a pure function of ``(seed, global step, rank)`` plus the data, so a run
resumed at ``start_step`` continues with exactly the batches the uninterrupted run would
have produced, and the number of DataLoader workers never changes a batch.

*Map-style datasets.* One global sample stream is the concatenation over data-epochs
``e = 0, 1, ...`` of a permutation of ``range(len(dataset))`` seeded by ``(seed, e)``. Global
batch ``b`` is ``stream[b*GB : (b+1)*GB]`` with ``GB = batch_size_per_rank * world_size``, and
rank ``r`` takes the contiguous chunk ``[b*GB + r*B, b*GB + (r+1)*B)``. So the concatenation
of the rank batches of a step does not depend on the world size, and resuming under another
world size continues with the samples the old run would have seen. One DataLoader item is
one whole step for this rank (the sampler counts steps from ``start_step``); DataLoader
returns items in order whatever the number of workers.

*Shards.* See :mod:`dinoscale.data.shards`: each rank reads ``streams_per_rank`` independent,
deterministic sample streams; step ``k`` of rank ``r`` is the next batch of stream
``k % streams_per_rank``. Resuming under the same world size and ``streams_per_rank`` skips
the consumed samples of each stream without decoding them.

Randomness. The augmentation of the sample at stream position ``p`` runs with torch's global
RNG seeded from ``(seed, p)`` inside :func:`torch.random.fork_rng` (so the main process RNG is
untouched when ``num_workers == 0``). The collate gets ``rng=random.Random(seed_k)`` with
``seed_k`` derived from ``(seed, step)`` (and torch's RNG seeded the same way while it runs), the same
on every rank: a collate draws batch-level randomness for the GLOBAL batch and derives per-sample
randomness from the sample's global position (see ``collate_multicrop``'s ``rank``/``world_size``), so
a step's batch is the same whether it is split over 1 or N ranks.

Bad data. A sample whose loading or transform raises one of
:data:`dinoscale.data.datasets.DECODE_ERRORS` is replaced by the next dataset index (map-style)
or by another sample of the same batch (shards), keeping every position intact. Skips are
reported with :func:`dinoscale.data.datasets.report_skip` in whichever process runs the
worker, travel back with the batch, are logged once per file/key in the main process and are
counted in :meth:`PretrainLoader.stats`. Only a run of ``max_consecutive_failures`` failures
in a row raises: that is a broken pipeline, not a bad file.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dinoscale.data.datasets import (
    DECODE_ERRORS,
    SkipEvent,
    collect_skips,
    derive_seed,
    log_skip,
    report_skip,
)

logger = logging.getLogger("dinoscale.data")

STAT_KEYS = ("corrupt_samples", "bad_shards", "padded_samples")
_EVENT_TO_STAT = {"corrupt_sample": "corrupt_samples", "bad_shard": "bad_shards", "padded_samples": "padded_samples"}


def run_seeded(seed: int, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with torch's global CPU RNG seeded by ``seed``; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def collate_step(
    collate_fn: Callable, samples: list, *, seed: int, step: int, rank: int
) -> Any:
    """Run the collate for global ``step`` with its step-derived ``rng``, the same on every rank.

    Collates draw randomness for the global batch (e.g. which crops get masks) and derive each sample's
    own from its global position, so batches do not depend on the world size (see collate_multicrop).
    """
    step_seed = derive_seed(seed, "collate", step)
    return run_seeded(step_seed, collate_fn, samples, rng=random.Random(step_seed))


def _describe(dataset: Any, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and 0 <= index < len(samples) and isinstance(samples[index], tuple):
        return str(samples[index][0])
    return type(dataset).__name__


class _StepCounter(torch.utils.data.Sampler):
    """Yields ``start, start + 1, ...`` forever: the global steps, one DataLoader item each."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            yield step
            step += 1


class MapStyleSteps(Dataset):
    """Item ``k`` is ``(k, collated batch of global step k for this rank, skip events)``.

    See the module docstring for the sample stream. The permutation of a data-epoch is
    computed on first use in each process and cached (at most two epochs at a time: a batch
    can straddle an epoch boundary).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable | None,
        collate_fn: Callable,
        *,
        batch_size_per_rank: int,
        seed: int,
        rank: int,
        world_size: int,
        max_consecutive_failures: int = 64,
    ):
        self.dataset = dataset
        self.transform = transform
        self.collate_fn = collate_fn
        self.batch_size = batch_size_per_rank
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_consecutive_failures = max_consecutive_failures
        self.num_samples = len(dataset)
        if self.num_samples < 1:
            raise ValueError("the dataset is empty")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng(derive_seed(self.seed, "epoch-permutation", epoch))
            dtype = np.int32 if self.num_samples < 2**31 else np.int64
            perm = rng.permutation(self.num_samples).astype(dtype)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def index_at(self, position: int) -> int:
        """Dataset index at global stream ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self.permutation(epoch)[offset])

    def load(self, position: int) -> tuple[Any, int]:
        """Transformed sample at stream ``position``; a bad index is replaced by the next one."""
        first = self.index_at(position)
        aug_seed = derive_seed(self.seed, "augment", position)
        last_error: BaseException | None = None
        for attempt in range(min(self.max_consecutive_failures, self.num_samples)):
            index = (first + attempt) % self.num_samples
            try:
                image, label = self.dataset[index]
                if self.transform is not None:
                    image = run_seeded(aug_seed, self.transform, image)
                return image, int(label)
            except DECODE_ERRORS as exc:
                last_error = exc
                report_skip("corrupt_sample", _describe(self.dataset, index), str(index), f"{type(exc).__name__}: {exc}")
        raise RuntimeError(
            f"{min(self.max_consecutive_failures, self.num_samples)} consecutive samples failed to load or "
            f"transform starting at dataset index {first} (last error: {last_error!r}); this points at a "
            "broken transform or data source rather than a few corrupt files"
        ) from last_error

    def __getitem__(self, step: int) -> tuple[int, Any, list[SkipEvent]]:
        start = step * self.batch_size * self.world_size + self.rank * self.batch_size
        with collect_skips() as events:
            samples = [self.load(start + i) for i in range(self.batch_size)]
            batch = collate_step(self.collate_fn, samples, seed=self.seed, step=step, rank=self.rank)
        return step, batch, list(events)


def _no_collate(item: Any) -> Any:
    # Items are already collated batches (one item = one step).
    return item


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SLURM's/scancel's stop signals to the main process.

    SLURM, ``timeout`` and job schedulers signal the whole process group. A worker killed by that signal would
    crash the trainer before it can save its checkpoint at the next step boundary; the main process ends the
    workers itself when it exits.
    """
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class PretrainLoader:
    """Infinite iterator of collated batches for one rank, starting at global step ``start_step``.

    Attributes:
        step: the global step of the next batch ``next()`` returns.
        samples_per_epoch: samples in one pass over the data (None when unknown).
        batch_size_per_rank, world_size: as given.
    """

    def __init__(
        self,
        steps: Dataset | IterableDataset,
        *,
        start_step: int,
        num_workers: int,
        seed: int,
        batch_size_per_rank: int,
        world_size: int,
        samples_per_epoch: int | None,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: int | None,
    ):
        self.step = start_step
        self.batch_size_per_rank = batch_size_per_rank
        self.world_size = world_size
        self.samples_per_epoch = samples_per_epoch
        kwargs: dict[str, Any] = dict(
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_no_collate,
            # Pinning needs CUDA; without it DataLoader would only warn.
            pin_memory=pin_memory and torch.cuda.is_available(),
            # DataLoader draws worker base seeds from this generator; without one it would
            # consume the global RNG. Our randomness does not use those seeds anyway.
            generator=torch.Generator().manual_seed(derive_seed(seed, "dataloader")),
        )
        if not isinstance(steps, IterableDataset):
            kwargs["sampler"] = _StepCounter(start_step)
        if num_workers > 0:
            kwargs["worker_init_fn"] = _ignore_stop_signals
            kwargs["persistent_workers"] = persistent_workers
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        self._dataloader = DataLoader(steps, **kwargs)
        self._iterator: Iterator | None = None
        self._counts: Counter = Counter({key: 0 for key in STAT_KEYS})
        self._logged: set[tuple[str, str, str]] = set()

    @property
    def steps_per_epoch(self) -> float | None:
        if self.samples_per_epoch is None:
            return None
        return self.samples_per_epoch / (self.batch_size_per_rank * self.world_size)

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._dataloader)
        step, batch, events = next(self._iterator)
        if step != self.step:
            raise RuntimeError(f"data loader returned step {step} while step {self.step} was expected")
        for event in events:
            self._counts[_EVENT_TO_STAT[event.kind]] += event.count
            ident = (event.kind, event.source, event.key)
            if ident not in self._logged:
                self._logged.add(ident)
                log_skip(event)
        self.step += 1
        return batch

    def stats(self) -> dict[str, int]:
        """Counts on this rank since the loader was built: ``corrupt_samples`` (records that could
        not be read/decoded/transformed and were replaced), ``bad_shards`` (shards that could not
        be opened or ended early) and ``padded_samples`` (samples repeated to fill a damaged
        shard epoch). Sum over ranks with ``dinoscale.distributed.all_reduce_sum_`` for the global
        figure (a collective: every rank must call it)."""
        return dict(self._counts)

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage collected)."""
        self._iterator = None

    def __repr__(self) -> str:
        return (
            f"PretrainLoader(step={self.step}, batch_size_per_rank={self.batch_size_per_rank}, "
            f"world_size={self.world_size}, samples_per_epoch={self.samples_per_epoch})"
        )


def build_pretrain_loader(
    source: Dataset | str,
    transform: Callable | None,
    collate_fn: Callable,
    *,
    batch_size_per_rank: int,
    num_workers: int,
    seed: int,
    start_step: int,
    rank: int,
    world_size: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    prefetch_factor: int | None = None,
    max_consecutive_failures: int = 64,
    streams_per_rank: int | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
) -> PretrainLoader:
    """Infinite iterator of this rank's collated batches, starting exactly at global ``start_step``.

    Args:
        source: a map-style ``(image, label)`` dataset, a :class:`dinoscale.data.shards.ShardDataset`
            or a shard spec string (brace pattern, directory with ``index.json``, ``pipe:``/http(s) URLs).
        transform: image -> crops (e.g. ``MultiCropAugmentation``); runs in the workers, seeded per
            sample. None passes images through.
        collate_fn: ``collate_fn(samples, rng=random.Random)`` with ``samples`` a list of
            ``(transformed image, label)``; runs in the workers.
        batch_size_per_rank, num_workers, seed, start_step, rank, world_size: as named.
        pin_memory: pin batches (only when CUDA is available).
        persistent_workers: keep workers alive (only with num_workers > 0).
        prefetch_factor: batches prefetched per worker (DataLoader default when None).
        max_consecutive_failures: consecutive bad samples tolerated before raising.
        streams_per_rank, shuffle_buffer, resampled: shard sources only, see
            :func:`dinoscale.data.shards.build_shard_steps`. ``streams_per_rank`` defaults to
            ``max(1, num_workers)`` and must be a multiple of ``num_workers``; batches depend on
            it (not on ``num_workers``), so keep it fixed across resumes.
    """
    if batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    common = dict(
        start_step=start_step,
        num_workers=num_workers,
        seed=seed,
        batch_size_per_rank=batch_size_per_rank,
        world_size=world_size,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
        prefetch_factor=prefetch_factor,
    )

    if isinstance(source, (str, IterableDataset)):
        from dinoscale.data.shards import ShardDataset, build_shard_steps

        if not isinstance(source, (str, ShardDataset)):
            raise TypeError(
                f"{type(source).__name__} is an iterable dataset; build_pretrain_loader needs a map-style "
                "dataset (exact resume needs random access) or WebDataset shards"
            )
        steps = build_shard_steps(
            source,
            transform,
            collate_fn,
            batch_size_per_rank=batch_size_per_rank,
            num_workers=num_workers,
            seed=seed,
            start_step=start_step,
            rank=rank,
            world_size=world_size,
            streams_per_rank=streams_per_rank,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            max_consecutive_failures=max_consecutive_failures,
        )
        return PretrainLoader(steps, samples_per_epoch=steps.samples_per_epoch, **common)
    if not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
        raise TypeError(f"source must be a map-style dataset or a shard spec string, got {type(source).__name__}")
    steps = MapStyleSteps(
        source,
        transform,
        collate_fn,
        batch_size_per_rank=batch_size_per_rank,
        seed=seed,
        rank=rank,
        world_size=world_size,
        max_consecutive_failures=max_consecutive_failures,
    )
    return PretrainLoader(steps, samples_per_epoch=len(source), **common)
