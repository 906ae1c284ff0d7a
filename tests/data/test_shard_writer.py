"""write_shards and tools/make_shards.py: index.json, shard contents, reproducibility, sources."""

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoscale.data.shard_writer import write_shards
from dinoscale.data.sources.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, FashionMNIST
from dinoscale.data.sources.shards import ShardDataset, iter_shard

REPO = Path(__file__).resolve().parents[2]
HAVE_FMNIST = (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").exists() or (
    Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte"
).exists()


def load_cli():
    spec = importlib.util.spec_from_file_location("make_shards_cli", REPO / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("name", ["../victim.txt", "VICTIM_ABS"])
def test_overwrite_refuses_an_index_naming_files_outside_its_folder(tmp_path, helpers, name):
    helpers.make_folder(tmp_path / "src", n=4)
    out = tmp_path / "shards"
    write_shards(str(tmp_path / "src"), out, max_samples_per_shard=2)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["name"] = str(victim) if name == "VICTIM_ABS" else name
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard names must be plain file names"):
        write_shards(str(tmp_path / "src"), out, max_samples_per_shard=2, overwrite=True)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("pattern", ["../shard-%06d.tar", "sub/shard-%06d.tar", "..\\shard-%06d.tar", "shard.tar"])
def test_shard_name_pattern_must_be_a_file_name(tmp_path, helpers, pattern):
    helpers.make_folder(tmp_path / "src", n=2)
    with pytest.raises(ValueError, match="pattern must be a file name"):
        write_shards(str(tmp_path / "src"), tmp_path / "out", pattern=pattern)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("shard-*"))


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
