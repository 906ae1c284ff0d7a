"""A shard cut off in its middle, read in the middle of the training stream: the run reads past it, counts it in
metrics.jsonl, and ends on time."""

from __future__ import annotations

import json
import time

import pytest

from dinoscale.data.shard_writer import write_shards
from tests.chaos.conftest import FMNIST, run_to_end

pytestmark = [pytest.mark.chaos, pytest.mark.skipif(not FMNIST.exists(), reason="needs dataset-fashion-mnist")]

RUN_BOUND_S = 120  # the whole run, start-up included (six steps of a tiny ViT take ~10 s): generous
STEPS = 6


def test_truncated_shard_mid_stream_is_counted_and_the_run_finishes(tmp_path):
    write_shards("fashion-mnist", tmp_path / "shards", max_samples_per_shard=32, limit=64)
    shards = tmp_path / "shards" / "train"
    # Two shards: each 4-shard segment of the (resampled) stream draws the damaged one among the others.
    victim = shards / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # its first samples read, then the tar breaks off

    started = time.monotonic()
    run = run_to_end(tmp_path / "out", [f"train.dataset={shards}", "train.num_workers=1", f"train.max_steps={STEPS}",
                                        "train.checkpoint_every=100"], timeout=RUN_BOUND_S)
    elapsed = time.monotonic() - started
    print(f"the run ended after {elapsed:.1f} s (bound {RUN_BOUND_S} s)")

    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if line]
    steps = [row for row in rows if "type" not in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["data/bad_shards"] >= 1, steps[-1]
    assert f"skipping bad shard {victim} [" in run.text()  # named, with the last key read from it
    assert elapsed < RUN_BOUND_S
