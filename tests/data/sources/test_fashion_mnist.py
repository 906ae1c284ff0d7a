"""FashionMNIST and its IDX reader."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dinoscale.data.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    is_fashion_mnist_spec,
    parse_fashion_mnist_spec,
    read_idx,
)

FMNIST_ROOT = Path(FASHION_MNIST_ROOT)
HAVE_FMNIST = all(
    (FMNIST_ROOT / name).exists() or (FMNIST_ROOT / (name + ".gz")).exists()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
)
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"Fashion-MNIST IDX files not in {FMNIST_ROOT} (Debian package dataset-fashion-mnist)"
)


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


def test_specs_name_the_split_and_the_folder():
    assert parse_fashion_mnist_spec("fashion-mnist") == ("train", FASHION_MNIST_ROOT)
    assert parse_fashion_mnist_spec("fashion-mnist:test") == ("test", FASHION_MNIST_ROOT)
    assert parse_fashion_mnist_spec("fashion-mnist:test:/data/fm") == ("test", "/data/fm")
    assert parse_fashion_mnist_spec("fashion-mnist:/data/fm") == ("train", "/data/fm")
    assert is_fashion_mnist_spec("fashion-mnist:test") and not is_fashion_mnist_spec("fashion-mnist-shards")
