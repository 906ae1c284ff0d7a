"""Deterministic shard streams: the sample sequences that pretraining reads from shards.

A shard set is read as ``T = groups * streams_per_group`` independent streams. Stream ``(group, member)``
has the global id ``t = member * groups + group``; which steps read it, and which rank, is decided in
:mod:`dinoscale.data.steps`. A stream is a sequence of *segments*, each at most :data:`SEGMENT_SHARDS`
shards, read in order through a shuffle buffer that is seeded per segment and drained at its end (so a
segment's output depends on that segment alone):

* epoch mode (``resampled=False``): in data-epoch ``e`` the shard list is permuted with
  ``(seed, e)``; the last ``K mod T`` shards of the permutation are left out of that epoch
  (the documented remainder: different shards each epoch, so none is left out for long) and
  stream ``t`` takes every ``T``-th of the rest, so within an epoch every sample is seen
  exactly once across all streams. Needs ``K >= T``.
* resampled mode (``resampled=True``, the pretraining default): segment ``i`` of a stream
  draws :data:`SEGMENT_SHARDS` shards uniformly with replacement, seeded by
  ``(seed, member, group, i)``. Infinite, no epochs.

A stream depends on the layout, the seed and the data only: not on the world size nor on the number of
DataLoader workers that read it.

When the index gives the counts, a segment always yields exactly its planned number of
samples: a missing, truncated or stale shard is reported, and the shortfall is filled by
repeating the segment's first samples (reported as ``padded_samples``). That keeps resume
exact with damaged data too: resuming skips whole segments from the counts without opening
them, and reads (never decodes) the rest of the partly consumed segment. Without counts
(``pipe:`` and URL specs), a resume reads and drops every sample the stream gave before: exact as
long as the shards read as they did, and slower the longer the run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from dinoscale.data.seeding import derive_seed
from dinoscale.data.skips import report_skip
from dinoscale.data.sources.shards import RawSample, ShardSet, iter_shard

SEGMENT_SHARDS = 4  # shards per shuffle segment; bounds what a resume has to read


@dataclass(frozen=True)
class StreamGroups:
    """How many streams a shard set is read as: ``groups`` groups of ``streams_per_group`` streams.

    Part of a run's data position (:mod:`dinoscale.data.steps` says which step reads which stream): fixed at
    the run's first start, recorded in its checkpoints and kept on resume.
    """

    groups: int
    streams_per_group: int

    def __post_init__(self):
        if self.groups < 1 or self.streams_per_group < 1:
            raise ValueError(f"shard stream groups and streams per group must be >= 1, got {self}")

    @property
    def num_streams(self) -> int:
        return self.groups * self.streams_per_group


@dataclass(frozen=True)
class StreamLayout:
    """How a shard set is split into streams (see the module docstring).

    ``streams``: the groups of streams, each shuffled through a buffer of ``shuffle_buffer`` samples, drawn with
    replacement (``resampled``) or in data-epochs; all seeded by ``seed``.
    """

    seed: int
    streams: StreamGroups
    shuffle_buffer: int
    resampled: bool


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: hold ``size`` items, emit a random one as each new item arrives, then the rest."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


@dataclass
class Segment:
    seed_id: tuple  # identifies the segment in seeds and logs
    shards: list[int]  # indices into the shard list
    planned: int | None  # samples the segment yields (None when counts are unknown)


class ShardStream:
    """Stream ``(group, member)``: an infinite, deterministic sequence of :class:`RawSample`.

    ``samples(skip)`` starts after the first ``skip`` samples (whole segments skipped from the
    index counts without opening them, the rest read but not decoded); ``report=False`` reads
    without reporting damage (for look-ahead reads of data that will be reported when reached).
    """

    def __init__(self, shard_set: ShardSet, layout: StreamLayout, group: int, member: int,
                 max_empty_segments: int = 64):
        self.shard_set = shard_set
        self.seed = layout.seed
        self.group = group
        self.member = member
        self.num_streams = layout.streams.num_streams
        self.global_stream = member * layout.streams.groups + group
        self.buffer_size = layout.shuffle_buffer
        self.resampled = layout.resampled
        self.max_empty_segments = max_empty_segments
        num_shards = len(shard_set.urls)
        if not self.resampled and num_shards < self.num_streams:
            raise ValueError(
                f"epoch mode needs at least as many shards as streams (groups * streams_per_group = "
                f"{self.num_streams}), {shard_set.spec!r} has {num_shards}; write smaller shards or use "
                "resampled=True"
            )

    def segments(self) -> Iterator[Segment]:
        counts = self.shard_set.counts
        num_shards = len(self.shard_set.urls)
        for epoch in range(2**62):
            if self.resampled:
                rng = np.random.default_rng(derive_seed(self.seed, "resample", self.member, self.group, epoch))
                chunks = [rng.integers(0, num_shards, size=SEGMENT_SHARDS).tolist()]
            else:
                order = np.random.default_rng(derive_seed(self.seed, "shard-order", epoch)).permutation(num_shards)
                used = order[: num_shards - num_shards % self.num_streams]
                mine = used[self.global_stream :: self.num_streams].tolist()
                chunks = [mine[i : i + SEGMENT_SHARDS] for i in range(0, len(mine), SEGMENT_SHARDS)]
            for c, shards in enumerate(chunks):
                planned = sum(counts[i] for i in shards) if counts is not None else None
                yield Segment((epoch, c), shards, planned)

    def _read_segment(self, segment: Segment, report: bool) -> Iterator[RawSample]:
        rng = random.Random(derive_seed(self.seed, "buffer", self.member, self.group, *segment.seed_id))
        counts = self.shard_set.counts

        def raw() -> Iterator[RawSample]:
            for i in segment.shards:
                yield from iter_shard(self.shard_set.urls[i], counts[i] if counts is not None else None, report)

        return shuffle_buffer(raw(), self.buffer_size, rng)

    def _segment_samples(self, segment: Segment, report: bool) -> Iterator[RawSample]:
        """Exactly ``planned`` samples when counts are known (padded/truncated), else what is there."""
        produced = 0
        for sample in self._read_segment(segment, report):
            if segment.planned is not None and produced == segment.planned:
                break  # stale index: already reported by iter_shard
            produced += 1
            yield sample
        if segment.planned is None or produced == segment.planned or produced == 0:
            return
        missing = segment.planned - produced
        names = ", ".join(os.path.basename(self.shard_set.urls[i]) for i in segment.shards)
        if report:
            report_skip(
                "padded_samples",
                names,
                f"stream {self.global_stream} segment {segment.seed_id}",
                f"{missing} of {segment.planned} samples unreadable",
                count=missing,
            )
        while missing > 0:
            before = missing
            for sample in self._read_segment(segment, report=False):
                yield sample
                missing -= 1
                if missing == 0:
                    break
            if missing == before:
                return  # the data vanished between the two reads: nothing left to repeat

    def samples(self, skip: int = 0, report: bool = True) -> Iterator[RawSample]:
        empty_in_a_row = 0
        for segment in self.segments():
            if skip and segment.planned is not None and skip >= segment.planned:
                skip -= segment.planned
                continue
            produced = 0
            for sample in self._segment_samples(segment, report):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                yield sample
            empty_in_a_row = empty_in_a_row + 1 if produced == 0 else 0
            if empty_in_a_row >= self.max_empty_segments:
                raise RuntimeError(
                    f"no sample could be read from {self.max_empty_segments} consecutive shard segments of "
                    f"{self.shard_set.spec!r} (stream {self.global_stream}); see the logged shard errors"
                )

