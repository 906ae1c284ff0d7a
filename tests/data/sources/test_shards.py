"""Reading shards: spec resolution, raw records, and the one-pass ShardDataset over ranks and workers."""

import json
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from dinoscale.data.sources.shards import ShardDataset, resolve_shards


def _identity(item):
    return item


def read_all(spec, **kw):
    return list(ShardDataset(str(spec), **kw))


def test_specs_brace_directory_and_errors(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=12, per_shard=4)
    by_dir = resolve_shards(str(out))
    assert [Path(u).name for u in by_dir.urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert by_dir.counts == [4, 4, 4] and by_dir.total == 12 and by_dir.classes == ["ant", "bee"]
    brace = resolve_shards(str(out / "shard-{000000..000001}.tar"))
    assert brace.urls == by_dir.urls[:2] and brace.counts == [4, 4]  # counts from the index beside them
    joined = resolve_shards(f"{out}/shard-000002.tar::{out}/shard-000000.tar")
    assert [Path(u).name for u in joined.urls] == ["shard-000002.tar", "shard-000000.tar"]
    assert resolve_shards(str(out / "index.json")).urls == by_dir.urls
    piped = resolve_shards(f"pipe:cat {out}/shard-{{000000..000002}}.tar")
    assert piped.counts is None and len(piped.urls) == 3
    assert sorted(helpers.image_id(b) for b, _ in read_all(piped.spec, image_format="bytes")) == list(range(12))
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a dinoscale shard index"):
        resolve_shards(str(tmp_path / "junk.json"))


def test_one_pass_reads_every_sample_once_over_ranks_and_workers(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=24, per_shard=3)  # 8 shards
    seen = []
    for rank in range(2):
        ds = ShardDataset(str(out), image_format="bytes", rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_identity)
        seen.extend(helpers.image_id(b) for b, _ in loader)
    assert sorted(seen) == list(range(24))
    assert len(list(ShardDataset(str(out), max_samples=7))) == 7


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/shard.tar", "..", ".", "", "a\\b.tar",
                                  "nul\0.tar", None, 7])
def test_index_naming_anything_but_a_file_of_its_directory_is_refused(tmp_path, helpers, name):
    out = helpers.write_set(tmp_path, n=8, per_shard=4)
    index = json.loads((out / "index.json").read_text())
    index["shards"][1]["name"] = name
    (out / "index.json").write_text(json.dumps(index))
    for spec in (out, out / "index.json", out / "shard-{000000..000001}.tar"):
        with pytest.raises(ValueError, match="shard names must be plain file names"):
            resolve_shards(str(spec))


def test_index_without_valid_counts_is_refused(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=8, per_shard=4)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["count"] = -3
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard 'shard-000000.tar' has no valid sample count"):
        resolve_shards(str(out))
