"""Skip reporting: collected inside collect_skips, logged once per (kind, source, key), tallied by the loader."""

import logging

from dinoscale.data.skips import STAT_KEYS, SkipEvent, SkipTally, collect_skips, report_skip


def test_collected_events_are_not_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"), collect_skips() as events:
        report_skip("corrupt_sample", "a.tar", "000001", "OSError: broken")
    assert events == [SkipEvent("corrupt_sample", "a.tar", "000001", "OSError: broken", 1)]
    assert caplog.records == []


def test_tally_counts_every_event_and_logs_each_place_once(caplog):
    tally = SkipTally()
    assert dict(tally.counts) == {key: 0 for key in STAT_KEYS}
    bad = SkipEvent("corrupt_sample", "a.tar", "000001", "OSError: broken")
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"):
        tally.add([bad, bad, SkipEvent("padded_samples", "a.tar", "stream 0", "3 of 8 unreadable", count=3)])
        tally.add([SkipEvent("bad_shard", "b.tar", "", "cannot open")])
    assert dict(tally.counts) == {"corrupt_samples": 2, "bad_shards": 1, "padded_samples": 3}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and sum("a.tar [000001]" in m for m in messages) == 1
    assert "repeating 3 sample(s) of a.tar [stream 0]" in messages[1]
