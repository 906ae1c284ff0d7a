"""Shard streams in training: epoch coverage over ranks and workers, the epoch remainder, damaged shards."""

import itertools
import logging

import pytest
import torch

from dinoscale.data.loader import build_pretrain_loader
from dinoscale.data.sources.shards import ShardDataset
from dinoscale.data.streams import StreamGroups


@pytest.mark.parametrize("resampled", [False, True])
def test_training_stream_covers_epoch_once_over_2_ranks_x_2_workers(tmp_path, helpers, resampled):
    out = helpers.write_set(tmp_path, n=40, per_shard=5)  # 8 shards, 4 streams of 2 shards each
    ids = []
    for rank in range(2):
        loader = build_pretrain_loader(
            str(out), helpers.id_transform, helpers.id_collate,
            batch_size_per_rank=5, num_workers=2, seed=1, start_step=0, rank=rank, world_size=2,
            resampled=resampled, shuffle_buffer=4,
        )  # fmt: skip
        batches = list(itertools.islice(loader, 4))  # 2 streams x 10 samples = one epoch per rank
        loader.close()
        ids.extend(torch.cat([b["id"] for b in batches]).tolist())
        assert loader.samples_per_epoch == 40 and loader.steps_per_epoch == 4
    if resampled:
        assert len(ids) == 40 and len(set(ids)) < 40  # with replacement: repeats expected
    else:
        assert sorted(ids) == list(range(40))


def test_epoch_mode_drops_remainder_shards_and_needs_enough_shards(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=20, per_shard=4)  # 5 shards, 2 streams -> 1 shard left out per epoch
    loader = build_pretrain_loader(
        str(out), helpers.id_transform, helpers.id_collate,
        batch_size_per_rank=4, num_workers=0, seed=2, start_step=0, rank=0, world_size=1,
        streams=StreamGroups(2, 1), resampled=False, shuffle_buffer=0,
    )  # fmt: skip
    epoch = torch.cat([b["id"] for b in itertools.islice(loader, 4)]).tolist()
    assert len(set(epoch)) == 16  # 4 of the 5 shards, each sample once
    with pytest.raises(ValueError, match="as many shards as streams \\(groups \\* streams_per_group = 8\\)"):
        build_pretrain_loader(
            str(out), None, helpers.id_collate, batch_size_per_rank=4, num_workers=0, seed=0,
            start_step=0, rank=0, world_size=4, streams=StreamGroups(2, 4), resampled=False,
        )  # fmt: skip


def test_planted_damage_skipped_and_counted(tmp_path, helpers, caplog):
    out = helpers.write_set(tmp_path, n=24, per_shard=3)  # 8 shards
    bad_key = helpers.replace_member(out / "shard-000001.tar", ".png", 1, b"\xff\xd8\xff\xe0 not a jpeg")
    data = (out / "shard-000003.tar").read_bytes()
    (out / "shard-000003.tar").write_bytes(data[: 512 + 100])  # inside the first member
    (out / "shard-000005.tar").unlink()
    expected_ids = set(range(24))

    # One pass: everything readable comes through once, damage is reported.
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"):
        got = [helpers.image_id(b) for b, _ in ShardDataset(str(out), image_format="pil")]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert len(got) == len(set(got)) == 24 - 1 - 3 - 3
    assert set(got) <= expected_ids
    assert f"shard-000001.tar [{bad_key}]" in messages
    assert "shard-000003.tar" in messages and "shard-000005.tar" in messages

    # Training stream: never stops, counts each problem once per occurrence, keeps batch sizes.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"):
        loader = build_pretrain_loader(
            str(out), helpers.id_transform, helpers.id_collate,
            batch_size_per_rank=4, num_workers=2, seed=0, start_step=0, rank=0, world_size=1,
            resampled=False, shuffle_buffer=4,
        )  # fmt: skip
        batches = list(itertools.islice(loader, 12))  # two epochs of 24 planned samples
        loader.close()
    stats = loader.stats()
    assert stats["bad_shards"] == 4  # truncated + missing, in each of the two epochs
    assert stats["padded_samples"] == 2 * 6  # their 6 planned samples, refilled in each epoch
    # The corrupt member is met once per epoch, plus once more if a refill repeats it.
    assert 2 <= stats["corrupt_samples"] <= 4
    assert all(b["id"].shape == (4,) for b in batches)
    # Slots of undecodable samples hold other (readable) samples of the batch.
    assert set(torch.cat([b["id"] for b in batches]).tolist()) <= set(got)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(f"[{bad_key}]" in m for m in messages) == 1  # logged once although met several times
    assert sum("shard-000005.tar" in m and "cannot open" in m for m in messages) == 1
