"""Writing shard sets: WebDataset tar shards plus their ``index.json`` (``tools/make_shards.py``).

The format is described in :mod:`dinoscale.data.sources.shards`, which reads it back. Sources: Fashion-MNIST
(both splits, one shard set each), an image folder or a list file. Unreadable images are validated out
before they reach a shard, and the output does not depend on the number of encoding processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import webdataset as wds
from PIL import Image

from dinoscale.data.seeding import derive_seed
from dinoscale.data.skips import report_skip
from dinoscale.data.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    is_fashion_mnist_spec,
)
from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.data.sources.shards import IMAGE_EXTS, INDEX_FORMAT, INDEX_NAME, is_shard_name, load_index
from dinoscale.data.transforms.decode import DECODE_ERRORS, load_rgb

_EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}  # one member name per format
# Fashion-MNIST pixels per (root, split), loaded once: forked encoder processes inherit them.
_FMNIST_IMAGES: dict[tuple[str, str], np.ndarray] = {}


class _Record(NamedTuple):
    """A sample to write: ``kind`` is "file" (``ref`` a path) or "fashion-mnist" (``ref`` an index)."""

    kind: str
    ref: str | int
    label: int
    split: str | None
    source: str


def _fmnist_records(root: str, split: str) -> list[_Record]:
    dataset = FashionMNIST(root=root, split=split)
    _FMNIST_IMAGES[(root, split)] = dataset.images.numpy()  # forked encoders inherit it
    return [
        _Record("fashion-mnist", i, int(label), split, f"fashion-mnist/{split}/{i}")
        for i, label in enumerate(dataset.targets.tolist())
    ]


def _folder_records(root: str) -> tuple[list[_Record], list[str]]:
    folder = ImageFolderDataset(root, image_format="bytes")
    rel = Path(root)
    records = [
        _Record("file", path, label, None, os.path.relpath(path, rel)) for path, label in folder.samples
    ]
    return records, folder.classes


def _list_records(list_file: str) -> tuple[list[_Record], list[str]]:
    """``path`` or ``path<TAB or space>label`` per line; label an int or a class name."""
    base = Path(list_file).parent
    entries: list[tuple[str, str | None]] = []
    with open(list_file, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "\t" in line:
                path, label = (part.strip() for part in line.rsplit("\t", 1))
            elif (base / line).is_file() or " " not in line:
                path, label = line, None
            else:
                path, label = line.rsplit(None, 1)
            entries.append((path, label or None))
    if not entries:
        raise ValueError(f"list file {list_file} names no images")
    labels = [label for _, label in entries if label is not None]
    if labels and len(labels) != len(entries):
        raise ValueError(f"list file {list_file}: either every line has a label or none does")
    classes: list[str] = []
    if labels and not all(label.lstrip("-").isdigit() for label in labels):
        classes = sorted(set(labels))
        to_id = {name: i for i, name in enumerate(classes)}
    records = []
    for path, label in entries:
        full = Path(path) if Path(path).is_absolute() else base / path
        if label is None:
            label_id = -1
        else:
            label_id = to_id[label] if classes else int(label)
        records.append(_Record("file", str(full), label_id, None, path))
    return records, classes


def _fmnist_image(root: str, split: str, index: int) -> np.ndarray:
    key = (root, split)
    if key not in _FMNIST_IMAGES:
        _FMNIST_IMAGES[key] = FashionMNIST(root=root, split=split).images.numpy()
    return _FMNIST_IMAGES[key][index]


def _encode_record(args: tuple[int, _Record, int | None, str]) -> dict[str, Any] | tuple[str, str]:
    """Sample dict ready for TarWriter, or ``(source, reason)`` when the record is unreadable."""
    number, record, jpeg_quality, fmnist_root = args
    try:
        if record.kind == "fashion-mnist":
            image = Image.fromarray(_fmnist_image(fmnist_root, record.split, int(record.ref)))
            fmt, ext = ("JPEG", "jpg") if jpeg_quality is not None else ("PNG", "png")
            buf = io.BytesIO()
            image.save(buf, format=fmt, **({"quality": jpeg_quality} if jpeg_quality is not None else {}))
            data, ext = buf.getvalue(), ext
        else:
            with open(record.ref, "rb") as f:
                original = f.read()
            rgb = load_rgb(original)  # also validates: corrupt files never reach a shard
            if jpeg_quality is None:
                ext = Path(record.ref).suffix.lower().lstrip(".")
                data, ext = original, _EXT_ALIASES.get(ext, ext)
            else:
                buf = io.BytesIO()
                rgb.save(buf, format="JPEG", quality=jpeg_quality)
                data, ext = buf.getvalue(), "jpg"
    except DECODE_ERRORS as exc:
        return record.source, f"{type(exc).__name__}: {exc}"
    sample = {
        "__key__": f"{number:09d}",
        ext: data,
        "json": json.dumps({"label": record.label, "split": record.split, "source": record.source}).encode(),
    }
    if record.label >= 0:
        sample["cls"] = str(record.label).encode()
    return sample


def parse_write_source(source: str) -> tuple[str, str]:
    """``(kind, location)`` for a make_shards SOURCE: fashion-mnist[:PATH], a folder or a list file."""
    if is_fashion_mnist_spec(source):
        return "fashion-mnist", source.partition(":")[2] or FASHION_MNIST_ROOT
    path = Path(source)
    if path.is_dir():
        return "folder", source
    if path.is_file():
        return "list", source
    raise FileNotFoundError(
        f"shard source {source!r} not found: expected 'fashion-mnist', 'fashion-mnist:PATH', an image folder "
        "or a list file (one image path per line, optionally followed by a label)"
    )


def _write_set(
    records: list[_Record],
    out_dir: Path,
    *,
    pattern: str,
    max_samples_per_shard: int,
    max_bytes_per_shard: float,
    jpeg_quality: int | None,
    num_workers: int,
    fmnist_root: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    skipped = 0
    exts: set[str] = set()
    jobs = [(i, record, jpeg_quality, fmnist_root) for i, record in enumerate(records)]
    writer: wds.ShardWriter | None = None

    def finished(fname: str) -> None:
        shards.append({"name": os.path.basename(fname), "count": writer.count, "bytes": os.path.getsize(fname)})

    pool = multiprocessing.get_context().Pool(num_workers) if num_workers > 1 else None
    try:
        encoded: Iterable = pool.imap(_encode_record, jobs, chunksize=16) if pool else map(_encode_record, jobs)
        for result in encoded:
            if isinstance(result, tuple):
                skipped += 1
                report_skip("corrupt_sample", result[0], "", result[1])
                continue
            if writer is None:
                # Opened lazily: ShardWriter creates its first file on construction.
                writer = wds.ShardWriter(
                    str(out_dir / pattern),
                    maxcount=max_samples_per_shard,
                    maxsize=max_bytes_per_shard,
                    post=finished,
                    verbose=0,
                    mtime=0,  # reproducible tar files
                )
            exts.update(k for k in result if k in IMAGE_EXTS)
            writer.write(result)
    finally:
        if pool is not None:
            pool.terminate()
        if writer is not None:
            writer.close()
    if not shards:
        raise ValueError(f"no readable image among the {len(records)} samples for {out_dir}")
    index = {
        "format": INDEX_FORMAT,
        "version": 1,
        **meta,
        "total": sum(s["count"] for s in shards),
        "skipped": skipped,
        "image_ext": sorted(exts),
        "shards": shards,
    }
    tmp = out_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / INDEX_NAME)
    return index


def write_shards(
    source: str,
    output_dir: str | os.PathLike,
    *,
    pattern: str = "shard-%06d.tar",
    max_samples_per_shard: int = 10000,
    max_bytes_per_shard: float = 1e9,
    jpeg_quality: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 1,
    limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write ``source`` as WebDataset shards with an ``index.json``; returns ``{split_or_"": index}``.

    Args:
        source: ``fashion-mnist`` / ``fashion-mnist:PATH`` (both splits, written to
            ``output_dir/train`` and ``output_dir/test``), an image folder (class sub-folders ->
            labels, flat -> unlabeled) or a list file (``path [label]`` per line, relative paths
            resolved against the list file's folder; labels ints or class names).
        output_dir: destination folder.
        pattern: printf-style shard file name, e.g. ``shard-%06d.tar``.
        max_samples_per_shard, max_bytes_per_shard: a new shard starts when either is reached
            (bytes count the payload; tar headers add 512 bytes per member).
        jpeg_quality: None keeps original file bytes (Fashion-MNIST: lossless PNG); an int
            re-encodes every image as JPEG with that quality.
        shuffle, seed: shuffle the sample order (seeded) before writing, so that a shard is a
            random slice of the data (a class-sorted folder would otherwise give one-class shards).
        num_workers: processes that read/validate/encode images (the output does not depend on it).
        limit: keep only the first ``limit`` samples (after shuffling) of each split.
        overwrite: allow writing into a folder that already holds an index.
    """
    if "%" not in pattern or not is_shard_name(pattern):
        raise ValueError(f"pattern must be a file name with a printf field such as 'shard-%06d.tar', got {pattern!r}")
    if max_samples_per_shard < 1 or max_bytes_per_shard <= 0:
        raise ValueError("max_samples_per_shard and max_bytes_per_shard must be positive")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    kind, location = parse_write_source(source)
    output_dir = Path(output_dir)
    if kind == "fashion-mnist":
        sets = [(split, output_dir / split, _fmnist_records(location, split), FASHION_MNIST_CLASSES) for split in ("train", "test")]
    elif kind == "folder":
        records, classes = _folder_records(location)
        sets = [(None, output_dir, records, classes)]
    else:
        records, classes = _list_records(location)
        sets = [(None, output_dir, records, classes)]
    for _, out_dir, _, _ in sets:
        old_index = out_dir / INDEX_NAME
        if old_index.exists():
            if not overwrite:
                raise FileExistsError(f"{old_index} exists; pass overwrite=True (--overwrite) to replace it")
            # Remove the old set's shards so a brace pattern cannot pick up stale files (load_index has checked
            # that every name is a file of this folder).
            for shard in load_index(old_index)["shards"]:
                (out_dir / shard["name"]).unlink(missing_ok=True)
            old_index.unlink()
    results = {}
    for split, out_dir, records, classes in sets:
        if shuffle:
            random.Random(derive_seed(seed, "write-shuffle", split or "")).shuffle(records)
        if limit is not None:
            records = records[:limit]
        meta = {
            "source": source,
            "split": split,
            "classes": list(classes) or None,
            "options": {
                "pattern": pattern,
                "max_samples_per_shard": max_samples_per_shard,
                "max_bytes_per_shard": max_bytes_per_shard,
                "jpeg_quality": jpeg_quality,
                "shuffle": shuffle,
                "seed": seed,
                "limit": limit,
            },
        }
        results[split or ""] = _write_set(
            records,
            out_dir,
            pattern=pattern,
            max_samples_per_shard=max_samples_per_shard,
            max_bytes_per_shard=max_bytes_per_shard,
            jpeg_quality=jpeg_quality,
            num_workers=num_workers,
            fmnist_root=location if kind == "fashion-mnist" else "",
            meta=meta,
        )
    return results
