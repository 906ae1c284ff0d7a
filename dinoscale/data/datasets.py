"""Image datasets behind one small interface.

Every dataset used by dinoscale is a map-style dataset whose ``__getitem__(i)`` returns
``(image, label)``:

* ``image`` is a PIL image, a ``uint8`` tensor of shape (C, H, W), or the encoded bytes of a
  JPEG/PNG/... file (the multi-crop augmentation accepts all three);
* ``label`` is an ``int``, ``-1`` when the sample is unlabeled;

and ``__len__`` gives the number of samples. Any torchvision dataset with RGB images already
fits. This module provides the two sources used by the examples and tests
(:class:`ImageFolderDataset`, :class:`FashionMNIST`) and :func:`wrap_with_transform`, which
applies a transform to the image of any such dataset (evaluation code uses it).

Bad data never stops training. A sample that cannot be read or decoded is *skipped*: the
dataset (or the loader, for errors raised by a transform) moves on to the next index and
reports the skip through :func:`report_skip`. Reports are logged once per (source, key) in
the reporting process, or, while a loader collects them with :func:`collect_skips`, handed
to the loader, which counts them and logs each one once in the main process (DataLoader
workers are separate processes, so their counts travel back with the batches).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("dinoscale.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

# Exceptions that mean "this particular file/record is bad" rather than "the code is wrong".
# PIL raises OSError (UnidentifiedImageError, truncated data), SyntaxError or ValueError
# (some plugins on malformed headers), EOFError (truncated multi-frame files) and
# DecompressionBombError (a deliberately huge image).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)


# ---------------------------------------------------------------------------------------
# Skip reporting
# ---------------------------------------------------------------------------------------


class SkipEvent(NamedTuple):
    """One skipped sample or shard.

    ``kind`` is one of ``"corrupt_sample"`` (a record that could not be read or decoded),
    ``"bad_shard"`` (a shard that could not be opened or ended early) or ``"padded_samples"``
    (samples repeated to keep a damaged shard epoch at its planned length; see shards.py).
    ``source`` names the file/shard, ``key`` the sample inside it ("" for whole files),
    ``reason`` the error, ``count`` how many samples the event stands for.
    """

    kind: str
    source: str
    key: str
    reason: str
    count: int = 1


_collector: list[SkipEvent] | None = None
_logged_here: set[tuple[str, str, str]] = set()


def report_skip(kind: str, source: str, key: str, reason: str, count: int = 1) -> None:
    """Record a skipped sample. Logged once per (kind, source, key) unless a loader collects."""
    event = SkipEvent(kind, str(source), str(key), str(reason), int(count))
    if _collector is not None:
        _collector.append(event)
        return
    ident = (event.kind, event.source, event.key)
    if ident not in _logged_here:
        _logged_here.add(ident)
        log_skip(event)


def log_skip(event: SkipEvent) -> None:
    where = f"{event.source} [{event.key}]" if event.key else event.source
    if event.kind == "padded_samples":
        logger.warning("repeating %d sample(s) of %s to keep the planned epoch length: %s", event.count, where, event.reason)
    else:
        logger.warning("skipping %s %s: %s", event.kind.replace("_", " "), where, event.reason)


@contextlib.contextmanager
def collect_skips() -> Iterator[list[SkipEvent]]:
    """Collect the :func:`report_skip` events raised inside the block instead of logging them."""
    global _collector
    previous = _collector
    events: list[SkipEvent] = []
    _collector = events
    try:
        yield events
    finally:
        _collector = previous


# ---------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_images(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    """All image files below ``directory`` (recursive, sorted, hidden entries ignored)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and name.lower().endswith(extensions):
                found.append(Path(dirpath) / name)
    return found


def load_rgb(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode an image file or encoded bytes fully into a PIL RGB image.

    ``convert`` forces the whole file to be decoded, so truncated data raises here (OSError)
    rather than later inside an augmentation.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(source) as img:
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images below ``root``, recursively.

    Labels: when ``root`` has sub-folders that contain images, each such first-level
    sub-folder is a class (sorted names -> ids 0..C-1, ``.classes``) and images directly in
    ``root`` are ignored (with a warning). A folder without such sub-folders (a flat folder)
    is unlabeled: every label is -1 and ``classes`` is empty.

    Args:
        root: the folder.
        transform: optional callable applied to the image (not the label).
        extensions: file-name endings that count as images (case-insensitive).
        image_format: ``"pil"`` returns a decoded RGB PIL image; ``"bytes"`` returns the file
            bytes untouched (the augmentation decodes them, and the bytes can be written to
            shards without re-encoding). In ``"bytes"`` mode only the header is checked here;
            a file that fails to decode later is skipped by the loader.

    Unreadable or corrupt files are skipped: ``dataset[i]`` then returns the next valid
    sample (index i+1, i+2, ... wrapping around), counts the file in ``num_skipped`` (per
    process) and reports it once through :func:`report_skip`. Only a folder without a
    single readable image raises.

    Attributes:
        samples: list of ``(path, label)``.
        classes: sorted class names (empty when unlabeled).
        class_to_idx: class name -> id.
        num_skipped: number of bad files met in this process.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        image_format: str = "pil",
    ):
        if image_format not in ("pil", "bytes"):
            raise ValueError(f"image_format must be 'pil' or 'bytes', got {image_format!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found or not a directory: {self.root}")
        self.transform = transform
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.image_format = image_format
        self.num_skipped = 0

        class_dirs = sorted(
            entry.name
            for entry in os.scandir(self.root)
            if entry.is_dir() and not _is_hidden(entry.name) and _scan_images(Path(entry.path), self.extensions)
        )
        samples: list[tuple[str, int]] = []
        if class_dirs:
            self.classes = class_dirs
            self.class_to_idx = {name: i for i, name in enumerate(class_dirs)}
            for name in class_dirs:
                samples.extend((str(p), self.class_to_idx[name]) for p in _scan_images(self.root / name, self.extensions))
            loose = [
                e.name for e in os.scandir(self.root) if e.is_file() and e.name.lower().endswith(self.extensions)
            ]
            if loose:
                logger.warning(
                    "%s has class sub-folders; ignoring %d image(s) directly in it (e.g. %s)",
                    self.root,
                    len(loose),
                    sorted(loose)[0],
                )
        else:
            self.classes = []
            self.class_to_idx = {}
            samples = [(str(p), -1) for p in _scan_images(self.root, self.extensions)]
        if not samples:
            raise ValueError(f"no image files with extensions {self.extensions} found under {self.root}")
        self.samples = samples

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        if self.image_format == "pil":
            return load_rgb(path)
        with open(path, "rb") as f:
            data = f.read()
        # Header check only: cheap, and catches empty / non-image files early.
        with Image.open(io.BytesIO(data)):
            pass
        return data

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for attempt in range(n):
            path, label = self.samples[(index + attempt) % n]
            try:
                image = self._load(path)
            except DECODE_ERRORS as exc:
                self.num_skipped += 1
                report_skip("corrupt_sample", path, "", f"{type(exc).__name__}: {exc}")
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label
        raise RuntimeError(f"none of the {n} image files under {self.root} could be read")

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabeled"
        return f"ImageFolderDataset(root={str(self.root)!r}, {len(self)} images, {kind}, image_format={self.image_format!r})"


# ---------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# Transform wrapper
# ---------------------------------------------------------------------------------------


class TransformedDataset(Dataset):
    """``dataset`` with ``transform`` applied to each image; labels and length unchanged."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label

    def __getattr__(self, name: str) -> Any:
        # Expose .classes, .samples, ... of the wrapped dataset. Guard against recursion
        # while unpickling (before __dict__ holds "dataset").
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def wrap_with_transform(dataset: Dataset, transform: Callable | None) -> Dataset:
    """Apply ``transform`` to the images of any ``(image, label)`` dataset (None: unchanged)."""
    if transform is None:
        return dataset
    return TransformedDataset(dataset, transform)


# ---------------------------------------------------------------------------------------
# Seeds and dataset specs
# ---------------------------------------------------------------------------------------


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (e.g. ``(seed, "augment", position)``).

    Hash-based, so nearby inputs give unrelated seeds and the result is the same on every
    machine and Python run (unlike ``hash()``).
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_shard_spec(spec: str) -> bool:
    """True when ``spec`` names WebDataset shards rather than a folder or Fashion-MNIST.

    Shards: ``pipe:``/``http(s):``/... URLs, brace patterns (``/d/shard-{000000..000127}.tar``),
    ``.tar`` files, an index file (``.json``) or a directory holding ``index.json`` (or
    sub-folders that do, e.g. the ``train``/``test`` sets written for Fashion-MNIST).
    """
    if "://" in spec or spec.startswith("pipe:") or "{" in spec:
        return True
    path = Path(spec)
    if path.suffix in (".tar", ".json") or spec.endswith((".tar.gz", ".tgz")):
        return True
    if not path.is_dir():
        return False
    # A shard set, or a folder of per-split shard sets (resolve_shards then names the splits).
    return (path / "index.json").is_file() or any((p / "index.json").is_file() for p in path.iterdir() if p.is_dir())


def open_dataset(spec: str, transform: Callable | None = None, max_samples: int | None = None):
    """Open a dataset from its config string.

    ``spec`` forms:

    * ``fashion-mnist[:train|:test][:PATH]`` -> :class:`FashionMNIST` (uint8 tensors);
    * an image folder -> :class:`ImageFolderDataset`: encoded bytes without a transform (the
      multi-crop augmentation decodes them, at reduced size when it can), PIL RGB with one;
    * shards (see :func:`is_shard_spec`) -> :class:`dinoscale.data.shards.ShardDataset`, an
      iterable dataset that :func:`dinoscale.data.loader.build_pretrain_loader` also accepts;
      like image folders, encoded bytes without a transform and PIL RGB with one.

    ``max_samples`` keeps the first that many samples (a quick subset for evaluation).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        split, root = "train", FASHION_MNIST_ROOT
        rest = spec[len("fashion-mnist:") :] if ":" in spec else ""
        if rest:
            head, _, tail = rest.partition(":")
            if head in _FASHION_MNIST_FILES:
                split, root = head, tail or FASHION_MNIST_ROOT
            else:
                root = rest
        dataset: Dataset = FashionMNIST(root=root, split=split, transform=transform)
    elif is_shard_spec(spec):
        from dinoscale.data.shards import ShardDataset

        image_format = "pil" if transform else "bytes"
        return ShardDataset(spec, transform=transform, max_samples=max_samples, image_format=image_format)
    elif Path(spec).is_dir():
        dataset = ImageFolderDataset(spec, transform=transform, image_format="pil" if transform else "bytes")
    else:
        raise FileNotFoundError(
            f"dataset {spec!r} not found. Expected fashion-mnist[:train|:test][:PATH], an image folder, "
            "a shard directory holding index.json, a brace pattern such as /data/shard-{000000..000127}.tar, "
            "or a pipe:/http(s): shard URL"
        )
    if max_samples is not None and max_samples < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_samples))
    return dataset
