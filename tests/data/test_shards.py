import importlib.util
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinoscale.data.loader import build_pretrain_loader
from dinoscale.data.open import open_dataset
from dinoscale.data.shard_writer import write_shards
from dinoscale.data.sources.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, FashionMNIST
from dinoscale.data.sources.shards import ShardDataset, iter_shard, resolve_shards

REPO = Path(__file__).resolve().parents[2]
HAVE_FMNIST = (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").exists() or (
    Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte"
).exists()


def load_cli():
    spec = importlib.util.spec_from_file_location("make_shards_cli", REPO / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _identity(item):
    return item


def read_all(spec, **kw):
    return list(ShardDataset(str(spec), **kw))


def test_write_from_folder_index_and_read_back(tmp_path, helpers):
    labels = helpers.make_folder(tmp_path / "src", n=10)
    (tmp_path / "src" / "ant" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "shards"
    result = write_shards(str(tmp_path / "src"), out, max_samples_per_shard=3, seed=5)
    index = json.loads((out / "index.json").read_text())
    assert result[""] == index
    assert index["format"] == "dinoscale-shards" and index["split"] is None
    assert index["classes"] == ["ant", "bee"]
    assert index["total"] == 10 and index["skipped"] == 1
    assert [s["count"] for s in index["shards"]] == [3, 3, 3, 1]
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert all((out / s["name"]).stat().st_size == s["bytes"] for s in index["shards"])
    assert index["image_ext"] == ["png"] and index["options"]["seed"] == 5
    samples = read_all(out, image_format="bytes")
    ids = [helpers.image_id(image) for image, _ in samples]
    assert sorted(ids) == list(range(10)) and ids != list(range(10))  # shuffled before writing
    assert all(label == labels[i] for i, (_, label) in zip(ids, samples))
    # Original bytes are kept.
    raw = next(iter_shard(str(out / "shard-000000.tar")))
    source = json.loads(next(iter(_members(out / "shard-000000.tar", ".json"))))["source"]
    assert raw.data == (tmp_path / "src" / source).read_bytes()
    # Same seed -> same shards, bit for bit (fixed mtime, ordered encoding), whatever the worker count.
    again = write_shards(str(tmp_path / "src"), tmp_path / "again", max_samples_per_shard=3, seed=5, num_workers=2)
    assert again[""]["shards"] == index["shards"]
    assert (tmp_path / "again" / "shard-000001.tar").read_bytes() == (out / "shard-000001.tar").read_bytes()


def _members(shard, suffix):
    import tarfile

    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix)]


def test_write_flat_folder_jpeg_and_limits(tmp_path, helpers):
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), i * 20, dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    index = write_shards(
        str(tmp_path), tmp_path / "out", jpeg_quality=80, max_bytes_per_shard=1500, shuffle=False, limit=5
    )[""]
    assert index["classes"] is None and index["total"] == 5 and index["image_ext"] == ["jpg"]
    assert len(index["shards"]) > 1  # byte limit splits shards
    samples = read_all(tmp_path / "out")
    assert [label for _, label in samples] == [-1] * 5
    assert abs(int(np.asarray(samples[2][0])[20, 20, 0]) - 40) <= 2  # JPEG of value 40, order kept
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(str(tmp_path), tmp_path / "out")
    index = write_shards(str(tmp_path), tmp_path / "out", overwrite=True, max_samples_per_shard=100)[""]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json", "shard-000000.tar"]


def test_write_from_list_file(tmp_path, helpers):
    helpers.make_folder(tmp_path / "img", n=4)
    lines = ["# comment", "img/ant/img000.png\tcat", "img/bee/img001.png\tdog", "", "img/ant/img002.png\tcat"]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    index = write_shards(str(tmp_path / "list.txt"), tmp_path / "out", shuffle=False)[""]
    assert index["classes"] == ["cat", "dog"] and index["total"] == 3
    samples = read_all(tmp_path / "out", image_format="bytes")
    assert [(helpers.image_id(b), label) for b, label in samples] == [(0, 0), (1, 1), (2, 0)]
    (tmp_path / "bad.txt").write_text("img/ant/img000.png 3\nimg/bee/img001.png\n")
    with pytest.raises(ValueError, match="every line has a label or none"):
        write_shards(str(tmp_path / "bad.txt"), tmp_path / "out2")


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST IDX files not in {FASHION_MNIST_ROOT}")
def test_cli_fashion_mnist_subset(tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["fashion-mnist", str(tmp_path), "--limit", "30", "--max-samples-per-shard", "8"]) == 0
    assert "train: 30 samples in 4 shards" in capsys.readouterr().out
    train = FashionMNIST(split="train")
    for split in ("train", "test"):
        index = json.loads((tmp_path / split / "index.json").read_text())
        assert index["split"] == split and index["total"] == 30 and index["classes"] == FASHION_MNIST_CLASSES
        assert [s["count"] for s in index["shards"]] == [8, 8, 8, 6]
    meta = [json.loads(b) for b in _members(tmp_path / "train" / "shard-000000.tar", ".json")]
    images = read_all(tmp_path / "train")[:8]
    for m, (image, label) in zip(meta, images):
        i = int(m["source"].rsplit("/", 1)[1])
        assert m["split"] == "train" and m["label"] == label == int(train.targets[i])
        assert np.array_equal(np.asarray(image)[..., 0], train.images[i].numpy())
    with pytest.raises(SystemExit):
        cli.main(["fashion-mnist", str(tmp_path)])  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.parse_size("500M") == 5e8 and cli.parse_size("2g") == 2e9


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
    assert isinstance(open_dataset(str(out)), ShardDataset)
    (tmp_path / "multi" / "train").mkdir(parents=True)
    (tmp_path / "multi" / "train" / "index.json").write_text((out / "index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"sub-folders \['train'\]"):
        open_dataset(str(tmp_path / "multi"))
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
        streams_per_rank=2, resampled=False, shuffle_buffer=0,
    )  # fmt: skip
    epoch = torch.cat([b["id"] for b in itertools.islice(loader, 4)]).tolist()
    assert len(set(epoch)) == 16  # 4 of the 5 shards, each sample once
    with pytest.raises(ValueError, match="at least world_size \\* streams_per_rank = 8 shards"):
        build_pretrain_loader(
            str(out), None, helpers.id_collate, batch_size_per_rank=4, num_workers=0, seed=0,
            start_step=0, rank=0, world_size=4, streams_per_rank=2, resampled=False,
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
