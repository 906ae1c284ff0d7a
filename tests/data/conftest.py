"""Helpers for the data tests (fixture ``helpers``): small image sets whose red channel holds the image id."""

import io
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.data.shard_writer import write_shards


def make_folder(root: Path, n: int = 32, classes=("ant", "bee")) -> dict[int, int]:
    """``n`` 8x8 PNG images, id i in the red channel, spread over class folders; returns id -> label."""
    labels = {}
    for i in range(n):
        label = i % len(classes)
        arr = np.zeros((8, 8, 3), dtype=np.uint8)
        arr[..., 0] = i
        arr[..., 1] = 255 - i
        path = root / classes[label] / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        labels[i] = label
    return labels


def write_image(path: Path, value: int, fmt: str = "PNG", size: int = 12) -> None:
    """A ``size`` x ``size`` image of grey ``value`` (one pixel off, so JPEG keeps some structure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[0, 0] = (value + 1) % 256  # not a flat image, so JPEG keeps some structure
    Image.fromarray(arr).save(path, format=fmt)


def image_id(image) -> int:
    """Inverse of make_folder: the id of a decoded image (PIL) or encoded bytes."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image)).convert("RGB")
    return int(np.asarray(image)[0, 0, 0])


def write_set(root: Path, n: int = 32, per_shard: int = 4, **kw) -> Path:
    make_folder(root / "src", n)
    write_shards(str(root / "src"), root / "shards", max_samples_per_shard=per_shard, **kw)
    return root / "shards"


def id_transform(image):
    """Stand-in augmentation: the sample id plus noise from torch's global RNG."""
    return {"id": torch.tensor(image_id(image)), "noise": torch.rand(2)}


def id_collate(samples, *, rng):
    return {
        "id": torch.stack([s[0]["id"] for s in samples]),
        "noise": torch.stack([s[0]["noise"] for s in samples]),
        "labels": torch.tensor([s[1] for s in samples]),
        "mask": torch.tensor([rng.random() for _ in samples]),
    }


def replace_member(shard: Path, suffix: str, key_index: int, data: bytes) -> str:
    """Rewrite ``shard`` with the ``key_index``-th member ending in ``suffix`` replaced by ``data``."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    hits = [m.name for m, _ in members if m.name.endswith(suffix)]
    target = hits[key_index]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name == target:
                payload = data
                member.size = len(data)
            tar.addfile(member, io.BytesIO(payload))
    return target.split(".")[0]


@pytest.fixture
def helpers():
    return types.SimpleNamespace(
        make_folder=make_folder,
        write_image=write_image,
        image_id=image_id,
        write_set=write_set,
        id_transform=id_transform,
        id_collate=id_collate,
        replace_member=replace_member,
    )
