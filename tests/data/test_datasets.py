import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.data.skips import collect_skips
from dinoscale.data.sources.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, FashionMNIST, read_idx
from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.data.sources.transformed import wrap_with_transform

FMNIST_ROOT = Path(FASHION_MNIST_ROOT)
HAVE_FMNIST = all(
    (FMNIST_ROOT / name).exists() or (FMNIST_ROOT / (name + ".gz")).exists()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"Fashion-MNIST IDX files not in {FMNIST_ROOT} (Debian package dataset-fashion-mnist)"
)


def _write_image(path: Path, value: int, fmt: str = "PNG", size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[0, 0] = (value + 1) % 256  # not a flat image, so JPEG keeps some structure
    Image.fromarray(arr).save(path, format=fmt)


def _jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_image_folder_with_classes(tmp_path):
    _write_image(tmp_path / "dog" / "a.png", 10)
    _write_image(tmp_path / "dog" / "nested" / "b.png", 20)  # recursive
    _write_image(tmp_path / "cat" / "c.jpg", 30, fmt="JPEG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / ".hidden" / "d.png", 40)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1}
    assert len(ds) == 3
    assert [(Path(p).name, label) for p, label in ds.samples] == [("c.jpg", 0), ("a.png", 1), ("b.png", 1)]
    image, label = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    assert np.asarray(image)[5, 5].tolist() == [10, 10, 10]


def test_image_folder_flat_is_unlabeled_and_bytes_mode(tmp_path):
    _write_image(tmp_path / "x.png", 50)
    _write_image(tmp_path / "y.PNG", 60)
    ds = ImageFolderDataset(tmp_path, image_format="bytes")
    assert ds.classes == [] and ds.targets == [-1, -1]
    data, label = ds[0]
    assert isinstance(data, bytes) and label == -1
    assert data == (tmp_path / "x.png").read_bytes()


def test_image_folder_corrupt_skipped_and_counted(tmp_path, caplog):
    _write_image(tmp_path / "a" / "0.png", 1)
    (tmp_path / "a" / "1.png").write_bytes(b"definitely not a png")
    truncated = _jpeg_bytes(77)
    (tmp_path / "a" / "2.jpg").write_bytes(truncated[: len(truncated) // 2])
    _write_image(tmp_path / "a" / "3.png", 3)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"):
        image, _ = ds[1]  # both 1.png and 2.jpg are bad -> next valid is 3.png
        ds[1]  # same bad files again: counted again, logged once
    assert np.asarray(image)[5, 5].tolist() == [3, 3, 3]
    assert ds.num_skipped == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("1.png" in m for m in messages) == 1
    assert sum("2.jpg" in m for m in messages) == 1
    # Wrap-around: the last file is fine, but a corrupt last file continues at index 0.
    (tmp_path / "a" / "3.png").write_bytes(b"")
    with collect_skips() as events:
        image, _ = ds[3]
    assert np.asarray(image)[5, 5].tolist() == [1, 1, 1]
    assert [e.kind for e in events] == ["corrupt_sample"] and events[0].source.endswith("3.png")


def test_image_folder_all_bad_and_empty(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"xx")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 1 image files"):
        ds[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")


def test_wrap_with_transform(tmp_path):
    _write_image(tmp_path / "k" / "a.png", 9)
    ds = wrap_with_transform(ImageFolderDataset(tmp_path), lambda img: torch.from_numpy(np.array(img)).sum())
    value, label = ds[0]
    assert int(value) == 9 * 3 * 144 - 9 * 3 + 10 * 3 and label == 0
    assert ds.classes == ["k"] and len(ds) == 1
    assert wrap_with_transform(ds, None) is ds


@needs_fmnist
def test_fashion_mnist_shapes_labels_length():
    train = FashionMNIST(split="train")
    test = FashionMNIST(split="test", image_format="pil")
    assert len(train) == 60000 and len(test) == 10000
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 28, 28)
    assert torch.equal(image[0], image[2])
    assert label == 9  # first training image is an ankle boot
    assert train.classes == FASHION_MNIST_CLASSES and len(train.classes) == 10
    counts = torch.bincount(train.targets, minlength=10)
    assert counts.tolist() == [6000] * 10
    pil, test_label = test[0]
    assert pil.mode == "RGB" and pil.size == (28, 28) and test_label == 9
    assert np.array_equal(np.asarray(pil)[..., 0], test.images[0].numpy())


def test_fashion_mnist_missing_path_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST(root=tmp_path / "nowhere")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "dataset-fashion-mnist" in message


def test_idx_reader_uncompressed_and_bad_header(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()
    (tmp_path / "t.idx").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "t.idx"), arr)
    (tmp_path / "bad.idx").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="header announces"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "float.idx").write_bytes(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4)
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx(tmp_path / "float.idx")
