"""The data position: which samples make global step ``k`` of a rank, and the step sources that build it.

Every global batch is a pure function of ``(seed, global step, global batch size)`` plus the data (and, for
shards, the stream groups fixed at the run's start), so a run resumed at ``start_step`` continues with
exactly the batches the uninterrupted run would have produced, whatever the number of DataLoader workers
and however the global batch is split over ranks. A step source is a dataset whose items are whole steps:
``(step, collated batch, skip events)``.

*Map-style datasets* (:class:`MapStyleSteps`). One global sample stream is the concatenation over
data-epochs ``e = 0, 1, ...`` of a permutation of ``range(len(dataset))`` seeded by ``(seed, e)``.
Global batch ``b`` is ``stream[b*GB : (b+1)*GB]`` with ``GB = batch_size_per_rank * world_size``, and
rank ``r`` takes the contiguous chunk ``[b*GB + r*B, b*GB + (r+1)*B)``. So the concatenation
of the rank batches of a step does not depend on the world size, and resuming under another
world size continues with the samples the old run would have seen. One DataLoader item is
one whole step for this rank (:class:`StepCounter` counts steps from ``start_step``); DataLoader
returns items in order whatever the number of workers.

*Shards* (:class:`ShardSteps`). The shard set is read as ``G`` groups of ``M`` independent, deterministic
sample streams (:mod:`dinoscale.data.streams`, :class:`StreamGroups`). Global step ``k`` reads group
``k % G``: ``GB / M`` samples from each of its streams, in stream order. Rank ``r`` of ``W`` reads whole
streams, the ``M / W`` of each group from ``r * M / W`` on, so the concatenation of the rank batches of a
step does not depend on the world size (any ``W`` dividing ``M``); a DataLoader worker reads whole groups,
so batches do not depend on ``num_workers`` either (any divisor of ``G``). ``G`` and ``M`` are fixed when a
run starts (:func:`default_stream_groups`: one group per worker, one stream per rank) and kept on resume,
which skips the consumed samples of each stream without decoding them.

Randomness. The augmentation of the sample at stream position ``p`` runs with torch's global
RNG seeded from ``(seed, p)`` inside :func:`torch.random.fork_rng` (so the main process RNG is
untouched when ``num_workers == 0``). The collate gets ``rng=random.Random(seed_k)`` with
``seed_k`` derived from ``(seed, step)`` (and torch's RNG seeded the same way while it runs), the same
on every rank: a collate draws batch-level randomness for the GLOBAL batch and derives per-sample
randomness from the sample's global position (see ``collate_multicrop``'s ``rank``/``world_size``), so
a step's batch is the same whether it is split over 1 or N ranks. A shard sample is augmented with a seed
from its stream and position in it, the same on whichever rank reads it. A transform with an
``at_step(step, seed)`` method (multi-resolution crops) is asked for step ``k``'s transform first
(:meth:`BatchRecipe.transform_at`), so what it draws per step (the crop sizes) is a function of ``(seed, k)``
too, the same on every rank and after a resume.

Bad data. A sample whose loading or transform raises one of
:data:`dinoscale.data.transforms.decode.DECODE_ERRORS` is replaced by the next dataset index
(map-style) or by another sample that the same stream gives the same step (shards), keeping every
position intact. The skips are collected with the step's batch (:mod:`dinoscale.data.skips`). Only a run of
``max_consecutive_failures`` failures in a row raises: that is a broken pipeline, not a bad file.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from dinoscale.data.seeding import derive_seed, run_seeded
from dinoscale.data.skips import SkipEvent, collect_skips, report_skip
from dinoscale.data.sources.shards import RawSample, ShardDataset, ShardSet, resolve_shards
from dinoscale.data.streams import ShardStream, StreamGroups, StreamLayout
from dinoscale.data.transforms.decode import DECODE_ERRORS, load_rgb


@dataclass(frozen=True)
class BatchRecipe:
    """How every step source makes this rank's batches.

    Each sample goes through ``transform`` (seeded per sample; None passes images through), the batch of
    ``batch_size_per_rank`` samples through ``collate_fn`` (seeded per step); ``rank`` of ``world_size``
    says which share of the global batch is this rank's. A run of ``max_consecutive_failures`` bad samples
    raises. ``with_index``: the collate's samples are ``(image, label, index)``, ``index`` the dataset index of
    the image actually loaded (a stable id in ``[0, len(dataset))``, e.g. for a memory bank; map-style only).
    """

    transform: Callable | None
    collate_fn: Callable
    batch_size_per_rank: int
    seed: int
    rank: int
    world_size: int
    max_consecutive_failures: int
    with_index: bool = False

    def transform_at(self, step: int) -> Callable | None:
        """The transform of global ``step``: ``transform.at_step(step, seed)`` when it draws something per step
        (e.g. :class:`dinoscale.data.transforms.multicrop.MultiCropAugmentation`'s crop sizes), else ``transform``."""
        at_step = getattr(self.transform, "at_step", None)
        return self.transform if at_step is None else at_step(step, self.seed)


def collate_step(collate_fn: Callable, samples: list, *, seed: int, step: int) -> Any:
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


class StepCounter(torch.utils.data.Sampler):
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

    def __init__(self, dataset: Dataset, recipe: BatchRecipe):
        self.dataset = dataset
        self.recipe = recipe
        self.num_samples = len(dataset)
        if self.num_samples < 1:
            raise ValueError("the dataset is empty")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng(derive_seed(self.recipe.seed, "epoch-permutation", epoch))
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

    def load(self, position: int, transform: Callable | None) -> tuple:
        """Sample ``(image, label)`` at stream ``position`` through ``transform`` (its step's:
        :meth:`BatchRecipe.transform_at`) (``(image, label, index)`` with the recipe's ``with_index``); a bad
        index is replaced by the next one."""
        first = self.index_at(position)
        aug_seed = derive_seed(self.recipe.seed, "augment", position)
        max_failures = min(self.recipe.max_consecutive_failures, self.num_samples)
        last_error: BaseException | None = None
        for attempt in range(max_failures):
            index = (first + attempt) % self.num_samples
            try:
                image, label = self.dataset[index]
                if transform is not None:
                    image = run_seeded(aug_seed, transform, image)
                return (image, int(label), index) if self.recipe.with_index else (image, int(label))
            except DECODE_ERRORS as exc:
                last_error = exc
                reason = f"{type(exc).__name__}: {exc}"
                report_skip("corrupt_sample", _describe(self.dataset, index), str(index), reason)
        raise RuntimeError(
            f"{max_failures} consecutive samples failed to load or "
            f"transform starting at dataset index {first} (last error: {last_error!r}); this points at a "
            "broken transform or data source rather than a few corrupt files"
        ) from last_error

    def __getitem__(self, step: int) -> tuple[int, Any, list[SkipEvent]]:
        r = self.recipe
        start = step * r.batch_size_per_rank * r.world_size + r.rank * r.batch_size_per_rank
        with collect_skips() as events:
            transform = r.transform_at(step)
            samples = [self.load(start + i, transform) for i in range(r.batch_size_per_rank)]
            batch = collate_step(r.collate_fn, samples, seed=r.seed, step=step)
        return step, batch, list(events)


class ShardSteps(IterableDataset):
    """Yields ``(step, collated batch, skip events)`` for global steps ``start_step, start_step + 1, ...``.

    Step ``k`` reads group ``g = k % G`` (``G`` groups of ``M`` streams): ``c = GB / M`` samples of each of
    this rank's streams ``(g, m)``, positions ``[(k // G) * c, (k // G + 1) * c)``, concatenated in stream
    order. DataLoader worker ``w`` of ``n`` produces the steps ``start_step + w + j*n``; since ``n`` divides
    ``G``, every group lives in exactly one worker, and DataLoader's round-robin returns the steps in order.

    The augmentation of the sample at position ``p`` of stream ``(g, m)`` is seeded from ``(seed, m, g, p)``.
    A sample that fails to decode/transform is reported and its slot filled with another sample of the same
    stream and step, re-augmented with the slot's own seed, so no position moves. If all of them fail, the
    following samples of the stream are used (read ahead, not consumed).
    """

    def __init__(
        self, shard_set: ShardSet, recipe: BatchRecipe, layout: StreamLayout, *, image_format: str, start_step: int
    ):
        self.shard_set = shard_set
        self.recipe = recipe
        self.layout = layout
        self.image_format = image_format
        self.start_step = start_step
        self.samples_per_epoch = shard_set.total
        per_group, world_size = layout.streams.streams_per_group, recipe.world_size
        global_batch = recipe.batch_size_per_rank * world_size
        if per_group % world_size:
            raise ValueError(
                f"the data position reads {per_group} shard stream(s) per step, each rank whole streams, so the "
                f"world size must divide {per_group}; got {world_size}. Use a world size dividing {per_group} (a "
                "resume: at the same global batch), or start a new run (train.shard_streams_per_group sets the "
                "number at a run's first start)"
            )
        if global_batch % per_group:
            raise ValueError(f"the global batch ({global_batch}) must be a multiple of the shard streams per step "
                             f"({per_group}): each stream gives an equal share of it")
        self.chunk = global_batch // per_group  # samples each stream gives a step
        mine = per_group // world_size
        self.members = range(recipe.rank * mine, (recipe.rank + 1) * mine)
        # Validates shard counts for epoch mode up front, in the main process.
        self._stream(0, 0)

    def _stream(self, group: int, member: int) -> ShardStream:
        return ShardStream(self.shard_set, self.layout, group, member)

    def consumed(self, group: int) -> int:
        """Samples of each stream of ``group`` used by steps ``0 .. start_step - 1``."""
        G = self.layout.streams.groups
        return max(0, (self.start_step - group + G - 1) // G) * self.chunk

    def _prepare(self, sample: RawSample, aug_seed: int, transform: Callable | None) -> tuple[Any, int]:
        image: Any = load_rgb(sample.data) if self.image_format == "pil" else sample.data
        if transform is not None:
            image = run_seeded(aug_seed, transform, image)
        return image, sample.label

    def _chunk(self, group: int, member: int, raws: list[RawSample], first_position: int,
               transform: Callable | None) -> list:
        """Prepared ``(image, label)`` per slot (through the step's ``transform``); failed slots get a donor
        sample, own seed."""
        r = self.recipe
        seeds = [derive_seed(r.seed, "augment", member, group, first_position + i) for i in range(len(raws))]
        out: list = [None] * len(raws)
        failed = []
        for i, sample in enumerate(raws):
            try:
                out[i] = self._prepare(sample, seeds[i], transform)
            except DECODE_ERRORS as exc:
                failed.append(i)
                report_skip("corrupt_sample", sample.url, sample.key, f"{type(exc).__name__}: {exc}")
        if not failed:
            return out
        n = len(raws)
        good = {i for i in range(n) if i not in failed}
        for i in failed:
            if good:
                # The next good slot after i in chunk order (cyclic).
                donor = raws[next((i + d) % n for d in range(1, n) if (i + d) % n in good)]
            else:
                donor = self._donor_ahead(group, member, first_position + n, transform)
            out[i] = self._prepare(donor, seeds[i], transform)
        return out

    def _donor_ahead(self, group: int, member: int, position: int, transform: Callable | None) -> RawSample:
        """First decodable sample of stream ``(group, member)`` from ``position`` on (read silently, not
        consumed)."""
        last_error: BaseException | None = None
        ahead = self._stream(group, member).samples(skip=position, report=False)
        max_failures = self.recipe.max_consecutive_failures
        for _, candidate in zip(range(max_failures), ahead):
            try:
                self._prepare(candidate, 0, transform)
                return candidate
            except DECODE_ERRORS as exc:
                last_error = exc
        raise RuntimeError(
            f"all the samples a stream gave a step and its next {max_failures} of {self.shard_set.spec!r} failed "
            f"to decode or transform (last error: {last_error!r}); this points at a broken transform or data "
            "source rather than a few corrupt files"
        ) from last_error

    def __iter__(self) -> Iterator[tuple[int, Any, list]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        r = self.recipe
        G = self.layout.streams.groups
        if G % workers:
            raise ValueError(f"the {G} shard stream groups must be a multiple of num_workers={workers}")
        streams: dict[tuple[int, int], Iterator[RawSample]] = {}
        step = self.start_step + worker
        while True:
            group = step % G
            first_position = (step // G) * self.chunk
            transform = r.transform_at(step)
            with collect_skips() as events:
                samples = []
                for member in self.members:
                    if (group, member) not in streams:
                        streams[group, member] = self._stream(group, member).samples(skip=self.consumed(group))
                    raws = [next(streams[group, member]) for _ in range(self.chunk)]
                    samples += self._chunk(group, member, raws, first_position, transform)
                batch = collate_step(r.collate_fn, samples, seed=r.seed, step=step)
            yield step, batch, list(events)
            step += workers


def default_stream_groups(num_workers: int, world_size: int) -> StreamGroups:
    """The stream groups of a run that sets none: one group per DataLoader worker (at least one), one stream
    per rank in each. A resume keeps them, so later worker counts should divide the first one and later world
    sizes the first world size."""
    return StreamGroups(groups=max(1, num_workers), streams_per_group=world_size)


def usable_workers(streams: StreamGroups, num_workers: int) -> int:
    """The most DataLoader workers, at most ``num_workers``, that can read ``streams``: a divisor of the groups
    (each worker reads whole groups), 0 for 0."""
    return max((n for n in range(1, num_workers + 1) if streams.groups % n == 0), default=0)


def build_shard_steps(
    source: str | ShardDataset,
    recipe: BatchRecipe,
    *,
    num_workers: int,
    start_step: int,
    streams: StreamGroups | None,
    shuffle_buffer: int,
    resampled: bool,
    image_format: str | None = None,
) -> ShardSteps:
    """The step source behind ``build_pretrain_loader`` for shards (see :class:`ShardSteps`).

    ``streams`` (default :func:`default_stream_groups`) is part of the data position: keep it across resumes.
    ``num_workers`` must divide its groups and the world size its streams per group; within these, batches do
    not depend on either. ``image_format`` defaults to the ShardDataset's, or ``"pil"`` for a spec string.
    """
    if recipe.with_index:
        raise ValueError("this method needs each sample's dataset index (with_index), which only a map-style "
                         "dataset gives (Fashion-MNIST, an image folder); shard samples carry no stable index")
    if isinstance(source, ShardDataset):
        shard_set, fmt = source.shard_set, source.image_format
    else:
        shard_set, fmt = resolve_shards(source), "pil"
    image_format = image_format or fmt
    if image_format not in ("pil", "bytes"):
        raise ValueError(f"image_format must be 'pil' or 'bytes', got {image_format!r}")
    streams = streams or default_stream_groups(num_workers, recipe.world_size)
    if streams.groups % max(1, num_workers):
        raise ValueError(
            f"the {streams.groups} shard stream groups must be a multiple of num_workers={num_workers} "
            "(each worker owns whole groups, which keeps batches independent of num_workers)"
        )
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    layout = StreamLayout(seed=recipe.seed, streams=streams, shuffle_buffer=shuffle_buffer, resampled=resampled)
    return ShardSteps(shard_set, recipe, layout, image_format=image_format, start_step=start_step)
