"""Reading WebDataset shards: the shard format, resolving shard specs, raw records, and a one-pass dataset.

Shard layout (written by :func:`dinoscale.data.shard_writer.write_shards` / ``tools/make_shards.py``)
-----------------------------------------------------------------------------------------------------
A shard set is a directory of tar files written with webdataset's ``ShardWriter``, plus
``index.json`` beside them. Each sample is ``KEY.<ext>`` (the image: original bytes, or
re-encoded JPEG/PNG), ``KEY.cls`` (the integer label, absent when unlabeled) and ``KEY.json``
(``{"label", "split", "source"}``). Keys are the 9-digit write order, unique within the set.
Fashion-MNIST becomes two shard sets, ``OUTPUT_DIR/train`` and ``OUTPUT_DIR/test``, each with
its own index (``"split"`` names it), so a split is selected by its directory.

``index.json``::

    {"format": "dinoscale-shards", "version": 1, "source": ..., "split": "train" | null,
     "classes": [...] | null, "total": N, "skipped": S, "image_ext": ["jpg", ...],
     "shards": [{"name": "shard-000000.tar", "count": 1000, "bytes": 123456}, ...],
     "options": {...}}

A shard ``name`` is a plain file name in the index's directory: never a path (no separator, not ``.`` or
``..``). :func:`load_index` refuses an index that names anything else, so neither a reader nor an overwrite
touches a file outside the shard directory.

Shard specs accepted by the readers: a directory holding ``index.json``, the index file
itself, a brace pattern (``/data/shard-{000000..000127}.tar``; ``::`` joins several), single
``.tar`` paths, or ``pipe:``/``http(s)://`` URLs (opened by webdataset's ``gopen``). Sample
counts come from the index when present (for local patterns, an ``index.json`` beside the
first shard that lists every shard is used), so epoch lengths never need a scan.

Training reads shards through :mod:`dinoscale.data.streams`; :class:`ShardDataset` is the one-pass
reader (evaluation, and the shard source type the pretraining loader accepts).
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from dinoscale.data.skips import report_skip
from dinoscale.data.sources.tar_stream import Prepended, is_compressed, iter_tar_files, read_first_block, tarfile_files
from dinoscale.data.transforms.decode import DECODE_ERRORS, load_rgb

INDEX_NAME = "index.json"
INDEX_FORMAT = "dinoscale-shards"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "gif")
# Errors that mean "this shard stream is damaged or unreachable".
SHARD_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)


@dataclass
class ShardSet:
    """Resolved shard spec: ``urls`` in order, per-shard ``counts`` (None when unknown), the index."""

    urls: list[str]
    counts: list[int] | None
    index: dict[str, Any] | None
    spec: str

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    @property
    def classes(self) -> list[str]:
        return list((self.index or {}).get("classes") or [])


def is_shard_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name that stays inside its directory (no separator, not ``.``/``..``)."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and not any(sep in name for sep in separators))


def load_index(path: str | os.PathLike) -> dict[str, Any]:
    """A shard index, checked: its format, and every shard a plain file name with a sample count."""
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read shard index {path}: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path} is not a dinoscale shard index (format {INDEX_FORMAT!r} with a 'shards' list)")
    for shard in index["shards"]:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not is_shard_name(name):
            raise ValueError(f"{path} names a shard {name!r}: shard names must be plain file names in the index's "
                             "directory (no path separator, not '.' or '..')")
        count = shard.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{path}: shard {name!r} has no valid sample count (got {count!r})")
    return index


def _from_index(index_path: Path, spec: str) -> ShardSet:
    index = load_index(index_path)
    base = index_path.parent
    urls = [str(base / s["name"]) for s in index["shards"]]
    counts = [int(s["count"]) for s in index["shards"]]
    if not urls:
        raise ValueError(f"{index_path} lists no shards")
    return ShardSet(urls, counts, index, spec)


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
    return (path / INDEX_NAME).is_file() or any((p / INDEX_NAME).is_file() for p in path.iterdir() if p.is_dir())


def resolve_shards(spec: str) -> ShardSet:
    """Turn a shard spec (see module docstring) into a :class:`ShardSet`."""
    path = Path(spec)
    if "://" not in spec and not spec.startswith("pipe:") and "{" not in spec and "::" not in spec:
        if path.is_dir():
            if (path / INDEX_NAME).is_file():
                return _from_index(path / INDEX_NAME, spec)
            splits = sorted(p.name for p in path.iterdir() if (p / INDEX_NAME).is_file())
            hint = f"; it has shard sets in sub-folders {splits}: pass one of them" if splits else ""
            raise FileNotFoundError(f"no {INDEX_NAME} in shard directory {path}{hint}")
        if path.suffix == ".json":
            return _from_index(path, spec)
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no URLs")
    counts = None
    index = None
    first = urls[0]
    if "://" not in first and not first.startswith("pipe:"):
        candidate = Path(first).parent / INDEX_NAME
        if candidate.is_file():
            found = load_index(candidate)
            by_name = {s["name"]: int(s["count"]) for s in found["shards"]}
            same_dir = all(Path(u).parent == Path(first).parent for u in urls)
            if same_dir and all(Path(u).name in by_name for u in urls):
                counts = [by_name[Path(u).name] for u in urls]
                index = found
    return ShardSet(urls, counts, index, spec)


class RawSample(NamedTuple):
    """One undecoded sample read from a shard."""

    key: str
    url: str
    data: bytes
    ext: str
    label: int


def _to_raw(key: str, url: str, fields: dict[str, bytes], report: bool) -> RawSample | None:
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    reason = None
    label = -1
    if ext is None:
        reason = f"no image member (found {sorted(fields)})"
    elif "cls" in fields:
        try:
            label = int(fields["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            reason = f"unreadable label {fields['cls'][:20]!r}"
    elif "json" in fields:
        try:
            label = int(json.loads(fields["json"]).get("label", -1))
        except (ValueError, TypeError, AttributeError):
            label = -1
    if reason is not None:
        if report:
            report_skip("corrupt_sample", url, key, reason)
        return None
    return RawSample(key, url, fields[ext], ext, label)


def _tar_files(stream) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream: plain tars by :mod:`tar_stream`'s reader, compressed
    ones (gzip, bzip2, xz) by ``tarfile``."""
    head = read_first_block(stream)
    if is_compressed(head):
        return tarfile_files(tarfile.open(fileobj=Prepended(head, stream), mode="r|*"))
    return iter_tar_files(stream, head)


def _tar_records(files: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per record of a streamed tar: consecutive members sharing a key."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    for name, data in files:
        prefix, suffix = base_plus_ext(name)
        if prefix is None or os.path.basename(name).startswith("__"):
            continue
        if prefix != key:
            if key is not None:
                yield key, fields
            key, fields = prefix, {}
        fields[suffix.lower()] = data
    if key is not None:
        yield key, fields


def iter_shard(url: str, expected: int | None = None, report: bool = True) -> Iterator[RawSample]:
    """Samples of one shard, undecoded, in file order.

    Never raises for bad data: a shard that cannot be opened or breaks off is reported as
    ``bad_shard`` (with the last good key) and ends; a record without an image or with a bad
    label is reported as ``corrupt_sample`` and skipped; a shard whose record count differs
    from ``expected`` (the index) is reported as ``bad_shard``. ``report=False`` silences all
    of that (used when a segment is re-read).
    """
    records = 0
    last_key = ""
    try:
        stream = gopen(url, "rb")
    except SHARD_ERRORS as exc:
        if report:
            report_skip("bad_shard", url, "", f"cannot open: {type(exc).__name__}: {exc}")
        return
    try:
        for key, fields in _tar_records(_tar_files(stream)):
            records += 1
            last_key = key
            sample = _to_raw(key, url, fields, report)
            if sample is not None:
                yield sample
    except SHARD_ERRORS as exc:
        if report:
            after = f" after key {last_key}" if last_key else " before the first sample"
            report_skip("bad_shard", url, last_key, f"truncated or unreadable{after}: {type(exc).__name__}: {exc}")
        return
    finally:
        try:
            stream.close()
        except SHARD_ERRORS:
            pass  # a pipe: command that failed has already been reported through its output
    if report and expected is not None and records != expected:
        state = "ends early" if records < expected else "holds more records than indexed (stale index)"
        report_skip("bad_shard", url, last_key, f"{state}: read {records} of {expected} records listed in the index")


class ShardDataset(IterableDataset):
    """One pass over a shard set in file order, yielding ``(image, label)``.

    Shard ``i`` is read by reader ``i mod (world_size * workers)`` (reader
    ``rank * workers + worker``), so ranks and DataLoader workers together read every sample
    exactly once. Bad records and shards are skipped and reported. Also the shard source type
    that :func:`dinoscale.data.loader.build_pretrain_loader` accepts (it then uses ``urls``,
    ``counts`` and ``image_format``, not this one-pass iteration).

    Args:
        spec: shard spec (see module docstring).
        transform: optional callable applied to the image.
        max_samples: stop after this many samples (the first ones in shard order when counts are
            known; per reader otherwise).
        image_format: ``"pil"`` decodes to RGB PIL images; ``"bytes"`` yields the encoded bytes.
        rank, world_size: this process's share of the shards.
    """

    def __init__(
        self,
        spec: str,
        transform: Callable | None = None,
        max_samples: int | None = None,
        image_format: str = "pil",
        rank: int = 0,
        world_size: int = 1,
    ):
        if image_format not in ("pil", "bytes"):
            raise ValueError(f"image_format must be 'pil' or 'bytes', got {image_format!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.shard_set = resolve_shards(spec)
        self.spec = spec
        self.transform = transform
        self.max_samples = max_samples
        self.image_format = image_format
        self.rank = rank
        self.world_size = world_size

    @property
    def urls(self) -> list[str]:
        return self.shard_set.urls

    @property
    def counts(self) -> list[int] | None:
        return self.shard_set.counts

    @property
    def classes(self) -> list[str]:
        return self.shard_set.classes

    @property
    def samples_per_epoch(self) -> int | None:
        return self.shard_set.total

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        counts = self.shard_set.counts
        offsets = np.concatenate([[0], np.cumsum(counts)]).tolist() if counts is not None else None
        emitted = 0
        for i, url in enumerate(self.shard_set.urls):
            if i % readers != reader:
                continue
            if self.max_samples is not None and offsets is not None and offsets[i] >= self.max_samples:
                break
            for position, sample in enumerate(iter_shard(url, counts[i] if counts is not None else None)):
                if self.max_samples is not None:
                    if offsets is not None and offsets[i] + position >= self.max_samples:
                        break
                    if offsets is None and emitted >= self.max_samples:
                        return
                try:
                    image: Any = load_rgb(sample.data) if self.image_format == "pil" else sample.data
                    if self.transform is not None:
                        image = self.transform(image)
                except DECODE_ERRORS as exc:
                    report_skip("corrupt_sample", url, sample.key, f"{type(exc).__name__}: {exc}")
                    continue
                emitted += 1
                yield image, sample.label

    def __repr__(self) -> str:
        return f"ShardDataset({self.spec!r}, {len(self.urls)} shards, samples={self.samples_per_epoch})"
