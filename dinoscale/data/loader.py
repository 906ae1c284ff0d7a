"""The resumable pretraining data loader: ``build_pretrain_loader(...)`` -> an infinite iterator of batches.

Batches come from a step source (:mod:`dinoscale.data.steps`: which samples make step ``k``, and how
they are seeded), run in DataLoader workers; this module starts them, checks that batches arrive in step
order, and counts and logs the skips that travel back with each batch (:mod:`dinoscale.data.skips`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dinoscale.data.seeding import derive_seed
from dinoscale.data.skips import SkipTally
from dinoscale.data.sources.shards import ShardDataset
from dinoscale.data.steps import BatchRecipe, MapStyleSteps, StepCounter, build_shard_steps
from dinoscale.data.streams import StreamGroups
from dinoscale.data.transforms.photometric_cpu import use_opencv_threads


def _no_collate(item: Any) -> Any:
    # Items are already collated batches (one item = one step).
    return item


def _init_worker(_worker_id: int) -> None:
    """Workers leave SLURM's/scancel's stop signals to the main process, and run OpenCV on one thread.

    SLURM, ``timeout`` and job schedulers signal the whole process group. A worker killed by that signal would
    crash the trainer before it can save its checkpoint at the next step boundary; the main process ends the
    workers itself when it exits. DataLoader gives each worker one torch thread; OpenCV (the per-sample photometry)
    would otherwise start a thread per core in every worker (a forked worker already has one: ``photometric_cpu``).
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    use_opencv_threads(torch.get_num_threads())


class PretrainLoader:
    """Infinite iterator of collated batches for one rank, starting at global step ``start_step``.

    Attributes:
        step: the global step of the next batch ``next()`` returns.
        samples_per_epoch: samples in one pass over the data (None when unknown).
        batch_size_per_rank, world_size: the recipe's.
    """

    def __init__(
        self,
        steps: Dataset | IterableDataset,
        recipe: BatchRecipe,
        *,
        start_step: int,
        num_workers: int,
        samples_per_epoch: int | None,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: int | None,
    ):
        self.step = start_step
        self.batch_size_per_rank = recipe.batch_size_per_rank
        self.world_size = recipe.world_size
        self.samples_per_epoch = samples_per_epoch
        kwargs: dict[str, Any] = dict(
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_no_collate,
            # Pinning needs CUDA; without it DataLoader would only warn.
            pin_memory=pin_memory and torch.cuda.is_available(),
            # DataLoader draws worker base seeds from this generator; without one it would
            # consume the global RNG. Our randomness does not use those seeds anyway.
            generator=torch.Generator().manual_seed(derive_seed(recipe.seed, "dataloader")),
        )
        if not isinstance(steps, IterableDataset):
            kwargs["sampler"] = StepCounter(start_step)
        if num_workers > 0:
            kwargs["worker_init_fn"] = _init_worker
            kwargs["persistent_workers"] = persistent_workers
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        self._dataloader = DataLoader(steps, **kwargs)
        self._iterator: Iterator | None = None
        self._skips = SkipTally()

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
        self._skips.add(events)
        self.step += 1
        return batch

    def stats(self) -> dict[str, int]:
        """Counts on this rank since the loader was built: ``corrupt_samples`` (records that could
        not be read/decoded/transformed and were replaced), ``bad_shards`` (shards that could not
        be opened or ended early) and ``padded_samples`` (samples repeated to fill a damaged
        shard epoch). Sum over ranks with ``dinoscale.distributed.all_reduce_sum_`` for the global
        figure (a collective: every rank must call it)."""
        return dict(self._skips.counts)

    def close(self) -> None:
        """Stop the worker processes now.

        Dropping the iterator is not enough: with persistent workers the DataLoader keeps its own reference to it,
        and the workers ignore SIGTERM (see ``_init_worker``), so a process that still had them when it
        exits would wait for them forever (multiprocessing's exit handler terminates and then joins them).
        """
        ours, kept = self._iterator, getattr(self._dataloader, "_iterator", None)  # kept: persistent workers
        self._iterator = None
        if kept is not None:
            self._dataloader._iterator = None
        for iterator in (ours, kept):
            shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator; idempotent
            if shutdown is not None:
                shutdown()

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
    streams: StreamGroups | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    with_index: bool = False,
) -> PretrainLoader:
    """Infinite iterator of this rank's collated batches, starting exactly at global ``start_step``.

    Args:
        source: a map-style ``(image, label)`` dataset, a :class:`dinoscale.data.sources.shards.ShardDataset`
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
        streams, shuffle_buffer, resampled: shard sources only, see
            :func:`dinoscale.data.steps.build_shard_steps`. ``streams`` (the stream groups) defaults to
            :func:`dinoscale.data.steps.default_stream_groups`; ``num_workers`` must divide its groups and
            ``world_size`` its streams per group. Batches depend on it (not on ``num_workers`` nor, at the same
            global batch, on ``world_size``), so keep it fixed across resumes.
        with_index: the collate's samples are ``(transformed image, label, dataset index)`` (map-style sources
            only; see :class:`dinoscale.data.steps.BatchRecipe`).
    """
    if batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

    recipe = BatchRecipe(transform, collate_fn, batch_size_per_rank=batch_size_per_rank, seed=seed, rank=rank,
                         world_size=world_size, max_consecutive_failures=max_consecutive_failures,
                         with_index=with_index)
    if isinstance(source, (str, IterableDataset)):
        if not isinstance(source, (str, ShardDataset)):
            raise TypeError(
                f"{type(source).__name__} is an iterable dataset; build_pretrain_loader needs a map-style "
                "dataset (exact resume needs random access) or WebDataset shards"
            )
        steps: Dataset | IterableDataset = build_shard_steps(
            source, recipe, num_workers=num_workers, start_step=start_step, streams=streams,
            shuffle_buffer=shuffle_buffer, resampled=resampled
        )
        samples_per_epoch = steps.samples_per_epoch
    else:
        if not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
            raise TypeError(f"source must be a map-style dataset or a shard spec string, got {type(source).__name__}")
        steps = MapStyleSteps(source, recipe)
        samples_per_epoch = len(source)
    return PretrainLoader(
        steps, recipe, start_step=start_step, num_workers=num_workers, samples_per_epoch=samples_per_epoch,
        pin_memory=pin_memory, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor
    )
