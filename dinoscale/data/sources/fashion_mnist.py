"""Fashion-MNIST, read straight from its IDX files."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_idx_file(root: Path, name: str):
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}. Install the Debian package "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist), which puts the IDX files in "
        f"{FASHION_MNIST_ROOT}, or pass root= pointing at a folder holding them."
    )




def is_fashion_mnist_spec(spec: str) -> bool:
    """True for ``fashion-mnist`` and ``fashion-mnist:...`` dataset/shard-source strings."""
    return spec == "fashion-mnist" or spec.startswith("fashion-mnist:")


def parse_fashion_mnist_spec(spec: str) -> tuple[str, str]:
    """``(split, root)`` of ``fashion-mnist[:train|:test][:PATH]`` (defaults: train, :data:`FASHION_MNIST_ROOT`)."""
    split, root = "train", FASHION_MNIST_ROOT
    rest = spec[len("fashion-mnist:") :] if ":" in spec else ""
    if rest:
        head, _, tail = rest.partition(":")
        if head in _FASHION_MNIST_FILES:
            split, root = head, tail or FASHION_MNIST_ROOT
        else:
            root = rest
    return split, root


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into a numpy array.

    Format: 2 zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one
    big-endian int32 size per dimension, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: header announces shape {shape} ({expected} bytes) but holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST read straight from the IDX files.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        transform: optional callable applied to the image.
        image_format: ``"tensor"`` gives a ``uint8`` tensor (3, 28, 28) (the gray channel
            repeated, so the RGB pipeline applies unchanged); ``"pil"`` gives a PIL RGB image.

    ``classes`` holds the 10 class names; ``targets`` the labels as a tensor.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | os.PathLike = FASHION_MNIST_ROOT,
        split: str = "train",
        transform: Callable | None = None,
        image_format: str = "tensor",
    ):
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if image_format not in ("tensor", "pil"):
            raise ValueError(f"image_format must be 'tensor' or 'pil', got {image_format!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.image_format = image_format
        image_name, label_name = _FASHION_MNIST_FILES[split]
        image_path = _open_idx_file(self.root, image_name)
        label_path = _open_idx_file(self.root, label_name)
        images = read_idx(image_path)
        labels = read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST files disagree: {image_path} has shape {images.shape}, {label_path} has {labels.shape}"
            )
        self.images = torch.from_numpy(images.copy())  # (N, 28, 28) uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        gray = self.images[index]
        if self.image_format == "tensor":
            image: Any = gray.unsqueeze(0).expand(3, -1, -1).contiguous()
        else:
            image = Image.fromarray(gray.numpy()).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(root={str(self.root)!r}, split={self.split!r}, {len(self)} images)"
