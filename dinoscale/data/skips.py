"""Bad data never stops training: skipped samples and shards are reported here, and counted by the loader.

A sample that cannot be read or decoded is *skipped*: the source (or the step source, for errors raised by
a transform) moves on and reports the skip through :func:`report_skip`. Reports are logged once per
(kind, source, key) in the reporting process, or, while a step source collects them with
:func:`collect_skips`, handed back with the batch (DataLoader workers are separate processes), and the
loader's :class:`SkipTally` counts them and logs each one once in the main process.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import NamedTuple

logger = logging.getLogger("dinoscale.data")

#: The loader's counters (``PretrainLoader.stats()``), one per event kind.
STAT_KEYS = ("corrupt_samples", "bad_shards", "padded_samples")
_EVENT_TO_STAT = {"corrupt_sample": "corrupt_samples", "bad_shard": "bad_shards", "padded_samples": "padded_samples"}


class SkipEvent(NamedTuple):
    """One skipped sample or shard.

    ``kind`` is one of ``"corrupt_sample"`` (a record that could not be read or decoded),
    ``"bad_shard"`` (a shard that could not be opened or ended early) or ``"padded_samples"``
    (samples repeated to keep a damaged shard segment at its planned length; see streams.py).
    ``source`` names the file/shard, ``key`` the sample inside it ("" for whole files),
    ``reason`` the error, ``count`` how many samples the event stands for.
    """

    kind: str
    source: str
    key: str
    reason: str
    count: int = 1


_collector: list[SkipEvent] | None = None
_logged_here: set[tuple[str, str, str]] = set()


def report_skip(kind: str, source: str, key: str, reason: str, count: int = 1) -> None:
    """Record a skipped sample. Logged once per (kind, source, key) unless a loader collects."""
    event = SkipEvent(kind, str(source), str(key), str(reason), int(count))
    if _collector is not None:
        _collector.append(event)
        return
    _log_once(event, _logged_here)


def log_skip(event: SkipEvent) -> None:
    where = f"{event.source} [{event.key}]" if event.key else event.source
    if event.kind == "padded_samples":
        logger.warning("repeating %d sample(s) of %s to keep the planned epoch length: %s", event.count, where, event.reason)
    else:
        logger.warning("skipping %s %s: %s", event.kind.replace("_", " "), where, event.reason)


def _log_once(event: SkipEvent, logged: set[tuple[str, str, str]]) -> None:
    ident = (event.kind, event.source, event.key)
    if ident not in logged:
        logged.add(ident)
        log_skip(event)


@contextlib.contextmanager
def collect_skips() -> Iterator[list[SkipEvent]]:
    """Collect the :func:`report_skip` events raised inside the block instead of logging them."""
    global _collector
    previous = _collector
    events: list[SkipEvent] = []
    _collector = events
    try:
        yield events
    finally:
        _collector = previous


class SkipTally:
    """The skips one loader has received: counted per :data:`STAT_KEYS` entry, each (kind, source, key) logged once."""

    def __init__(self):
        self.counts: Counter = Counter({key: 0 for key in STAT_KEYS})
        self._logged: set[tuple[str, str, str]] = set()

    def add(self, events: Iterable[SkipEvent]) -> None:
        for event in events:
            self.counts[_EVENT_TO_STAT[event.kind]] += event.count
            _log_once(event, self._logged)
