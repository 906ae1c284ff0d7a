"""open_dataset: which source a config string opens."""

import pytest

from dinoscale.data.open import open_dataset
from dinoscale.data.sources.shards import ShardDataset


def test_shard_directories_open_as_shard_datasets(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=12, per_shard=4)
    assert isinstance(open_dataset(str(out)), ShardDataset)
    (tmp_path / "multi" / "train").mkdir(parents=True)
    (tmp_path / "multi" / "train" / "index.json").write_text((out / "index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"sub-folders \['train'\]"):
        open_dataset(str(tmp_path / "multi"))
