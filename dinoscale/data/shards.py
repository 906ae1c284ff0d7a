"""WebDataset shards: writing them, reading them back, and the deterministic per-rank streams.

Shard layout (written by :func:`write_shards` / ``tools/make_shards.py``)
----------------------------------------------------------------------
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

Shard specs accepted by the readers: a directory holding ``index.json``, the index file
itself, a brace pattern (``/data/shard-{000000..000127}.tar``; ``::`` joins several), single
``.tar`` paths, or ``pipe:``/``http(s)://`` URLs (opened by webdataset's ``gopen``). Sample
counts come from the index when present (for local patterns, an ``index.json`` beside the
first shard that lists every shard is used), so epoch lengths never need a scan.

Training streams
----------------
Each rank reads ``S = streams_per_rank`` independent streams; global stream id
``g = rank * S + s`` of ``T = world_size * S``. A stream is a sequence of *segments*, each at
most :data:`SEGMENT_SHARDS` shards, read in order through a shuffle buffer that is seeded per
segment and drained at its end (so a segment's output depends on that segment alone):

* epoch mode (``resampled=False``): in data-epoch ``e`` the shard list is permuted with
  ``(seed, e)``; the last ``K mod T`` shards of the permutation are left out of that epoch
  (the documented remainder: different shards each epoch, so none is left out for long) and
  stream ``g`` takes every ``T``-th of the rest, so within an epoch every sample is seen
  exactly once across all ranks and workers. Needs ``K >= T``.
* resampled mode (``resampled=True``, the pretraining default): segment ``t`` of a stream
  draws :data:`SEGMENT_SHARDS` shards uniformly with replacement, seeded by
  ``(seed, rank, s, t)``. Infinite, no epochs.

When the index gives the counts, a segment always yields exactly its planned number of
samples: a missing, truncated or stale shard is reported, and the shortfall is filled by
repeating the segment's first samples (reported as ``padded_samples``). That keeps resume
exact with damaged data too: resuming skips whole segments from the counts without opening
them, and reads (never decodes) the rest of the partly consumed segment. Without counts,
the consumed samples are read and dropped.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dinoscale.data.datasets import (
    DECODE_ERRORS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    FashionMNIST,
    ImageFolderDataset,
    collect_skips,
    derive_seed,
    load_rgb,
    report_skip,
)

logger = logging.getLogger("dinoscale.data")

INDEX_NAME = "index.json"
INDEX_FORMAT = "dinoscale-shards"
SEGMENT_SHARDS = 4  # shards per shuffle segment; bounds what a resume has to read
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "gif")
_EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}
# Errors that mean "this shard stream is damaged or unreachable".
SHARD_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


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
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
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
    import webdataset as wds

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
    if "%" not in pattern or os.sep in pattern:
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
            # Remove the old set's shards so a brace pattern cannot pick up stale files.
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


# ---------------------------------------------------------------------------------------
# Resolving specs and reading tar files
# ---------------------------------------------------------------------------------------


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


def load_index(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read shard index {path}: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path} is not a dinoscale shard index (format {INDEX_FORMAT!r} with a 'shards' list)")
    return index


def _from_index(index_path: Path, spec: str) -> ShardSet:
    index = load_index(index_path)
    base = index_path.parent
    urls = [str(base / s["name"]) for s in index["shards"]]
    counts = [int(s["count"]) for s in index["shards"]]
    if not urls:
        raise ValueError(f"{index_path} lists no shards")
    return ShardSet(urls, counts, index, spec)


def resolve_shards(spec: str) -> ShardSet:
    """Turn a shard spec (see module docstring) into a :class:`ShardSet`."""
    from webdataset.shardlists import expand_urls

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


def iter_shard(url: str, expected: int | None = None, report: bool = True) -> Iterator[RawSample]:
    """Samples of one shard, undecoded, in file order.

    Never raises for bad data: a shard that cannot be opened or breaks off is reported as
    ``bad_shard`` (with the last good key) and ends; a record without an image or with a bad
    label is reported as ``corrupt_sample`` and skipped; a shard whose record count differs
    from ``expected`` (the index) is reported as ``bad_shard``. ``report=False`` silences all
    of that (used when a segment is re-read).
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    records = 0
    last_key = ""
    try:
        stream = gopen(url, "rb")
    except SHARD_ERRORS as exc:
        if report:
            report_skip("bad_shard", url, "", f"cannot open: {type(exc).__name__}: {exc}")
        return
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        key: str | None = None
        fields: dict[str, bytes] = {}
        for member in tar:
            if not member.isreg():
                continue
            prefix, suffix = base_plus_ext(member.name)
            if prefix is None or os.path.basename(member.name).startswith("__"):
                continue
            data = tar.extractfile(member).read()
            tar.members = []  # streaming: do not keep every header in memory
            if prefix != key:
                if key is not None:
                    records += 1
                    last_key = key
                    sample = _to_raw(key, url, fields, report)
                    if sample is not None:
                        yield sample
                key, fields = prefix, {}
            fields[suffix.lower()] = data
        if key is not None:
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


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: hold ``size`` items, emit a random one as each new item arrives, then the rest."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------------------------------
# Deterministic streams
# ---------------------------------------------------------------------------------------


@dataclass
class Segment:
    seed_id: tuple  # identifies the segment in seeds and logs
    shards: list[int]  # indices into the shard list
    planned: int | None  # samples the segment yields (None when counts are unknown)


class ShardStream:
    """Stream ``s`` of ``rank``: an infinite, deterministic sequence of :class:`RawSample`.

    ``samples(skip)`` starts after the first ``skip`` samples (whole segments skipped from the
    index counts without opening them, the rest read but not decoded); ``report=False`` reads
    without reporting damage (for look-ahead reads of data that will be reported when reached).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        seed: int,
        rank: int,
        world_size: int,
        stream: int,
        streams_per_rank: int,
        shuffle_buffer: int,
        resampled: bool,
        max_empty_segments: int = 64,
    ):
        self.shard_set = shard_set
        self.seed = seed
        self.rank = rank
        self.stream = stream
        self.num_streams = world_size * streams_per_rank
        self.global_stream = rank * streams_per_rank + stream
        self.buffer_size = shuffle_buffer
        self.resampled = resampled
        self.max_empty_segments = max_empty_segments
        num_shards = len(shard_set.urls)
        if not resampled and num_shards < self.num_streams:
            raise ValueError(
                f"epoch mode needs at least world_size * streams_per_rank = {self.num_streams} shards, "
                f"{shard_set.spec!r} has {num_shards}; write smaller shards or use resampled=True"
            )

    def segments(self) -> Iterator[Segment]:
        counts = self.shard_set.counts
        num_shards = len(self.shard_set.urls)
        for epoch in range(2**62):
            if self.resampled:
                rng = np.random.default_rng(derive_seed(self.seed, "resample", self.rank, self.stream, epoch))
                chunks = [rng.integers(0, num_shards, size=SEGMENT_SHARDS).tolist()]
            else:
                order = np.random.default_rng(derive_seed(self.seed, "shard-order", epoch)).permutation(num_shards)
                used = order[: num_shards - num_shards % self.num_streams]
                mine = used[self.global_stream :: self.num_streams].tolist()
                chunks = [mine[i : i + SEGMENT_SHARDS] for i in range(0, len(mine), SEGMENT_SHARDS)]
            for c, shards in enumerate(chunks):
                planned = sum(counts[i] for i in shards) if counts is not None else None
                yield Segment((epoch, c), shards, planned)

    def _read_segment(self, segment: Segment, report: bool) -> Iterator[RawSample]:
        rng = random.Random(derive_seed(self.seed, "buffer", self.rank, self.stream, *segment.seed_id))
        counts = self.shard_set.counts

        def raw() -> Iterator[RawSample]:
            for i in segment.shards:
                yield from iter_shard(self.shard_set.urls[i], counts[i] if counts is not None else None, report)

        return shuffle_buffer(raw(), self.buffer_size, rng)

    def _segment_samples(self, segment: Segment, report: bool) -> Iterator[RawSample]:
        """Exactly ``planned`` samples when counts are known (padded/truncated), else what is there."""
        produced = 0
        for sample in self._read_segment(segment, report):
            if segment.planned is not None and produced == segment.planned:
                break  # stale index: already reported by iter_shard
            produced += 1
            yield sample
        if segment.planned is None or produced == segment.planned or produced == 0:
            return
        missing = segment.planned - produced
        names = ", ".join(os.path.basename(self.shard_set.urls[i]) for i in segment.shards)
        if report:
            report_skip(
                "padded_samples",
                names,
                f"stream {self.global_stream} segment {segment.seed_id}",
                f"{missing} of {segment.planned} samples unreadable",
                count=missing,
            )
        while missing > 0:
            before = missing
            for sample in self._read_segment(segment, report=False):
                yield sample
                missing -= 1
                if missing == 0:
                    break
            if missing == before:
                return  # the data vanished between the two reads: nothing left to repeat

    def samples(self, skip: int = 0, report: bool = True) -> Iterator[RawSample]:
        empty_in_a_row = 0
        for segment in self.segments():
            if skip and segment.planned is not None and skip >= segment.planned:
                skip -= segment.planned
                continue
            produced = 0
            for sample in self._segment_samples(segment, report):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                yield sample
            empty_in_a_row = empty_in_a_row + 1 if produced == 0 else 0
            if empty_in_a_row >= self.max_empty_segments:
                raise RuntimeError(
                    f"no sample could be read from {self.max_empty_segments} consecutive shard segments of "
                    f"{self.shard_set.spec!r} (stream {self.global_stream}); see the logged shard errors"
                )


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


# ---------------------------------------------------------------------------------------
# Training steps from shards
# ---------------------------------------------------------------------------------------


class ShardSteps(IterableDataset):
    """Yields ``(step, collated batch, skip events)`` for global steps ``start_step, start_step + 1, ...``.

    Step ``k`` is batch number ``k // S`` of stream ``k % S`` (``S = streams_per_rank``), i.e.
    stream positions ``[(k // S) * B, (k // S + 1) * B)``. DataLoader worker ``w`` of ``n``
    produces the steps ``start_step + w + j*n``; since ``n`` divides ``S``, every stream lives in
    exactly one worker, and DataLoader's round-robin returns the steps in order.

    The augmentation of the sample at position ``p`` of stream ``s`` is seeded from
    ``(seed, rank, s, p)``. A sample that fails to decode/transform is reported and its slot
    filled with another sample of the same batch, re-augmented with the slot's own seed, so
    no position moves. If a whole batch fails, the following samples of the stream are used
    (read ahead, not consumed).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        transform: Callable | None,
        collate_fn: Callable,
        *,
        image_format: str,
        batch_size_per_rank: int,
        num_workers: int,
        seed: int,
        start_step: int,
        rank: int,
        world_size: int,
        streams_per_rank: int,
        shuffle_buffer: int,
        resampled: bool,
        max_consecutive_failures: int,
    ):
        self.shard_set = shard_set
        self.transform = transform
        self.collate_fn = collate_fn
        self.image_format = image_format
        self.batch_size = batch_size_per_rank
        self.num_workers = num_workers
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.streams_per_rank = streams_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.max_consecutive_failures = max_consecutive_failures
        self.samples_per_epoch = shard_set.total
        # Validates shard counts for epoch mode up front, in the main process.
        self._stream(0)

    def _stream(self, s: int) -> ShardStream:
        return ShardStream(
            self.shard_set,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            stream=s,
            streams_per_rank=self.streams_per_rank,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
        )

    def consumed(self, s: int) -> int:
        """Samples of stream ``s`` used by steps ``0 .. start_step - 1``."""
        S = self.streams_per_rank
        return max(0, (self.start_step - s + S - 1) // S) * self.batch_size

    def _prepare(self, sample: RawSample, aug_seed: int) -> tuple[Any, int]:
        from dinoscale.data.loader import run_seeded

        image: Any = load_rgb(sample.data) if self.image_format == "pil" else sample.data
        if self.transform is not None:
            image = run_seeded(aug_seed, self.transform, image)
        return image, sample.label

    def _batch(self, s: int, raws: list[RawSample], first_position: int) -> list:
        """Prepared ``(image, label)`` per slot; failed slots get a donor sample, own seed."""
        seeds = [derive_seed(self.seed, "augment", self.rank, s, first_position + i) for i in range(len(raws))]
        out: list = [None] * len(raws)
        failed = []
        for i, sample in enumerate(raws):
            try:
                out[i] = self._prepare(sample, seeds[i])
            except DECODE_ERRORS as exc:
                failed.append(i)
                report_skip("corrupt_sample", sample.url, sample.key, f"{type(exc).__name__}: {exc}")
        if not failed:
            return out
        n = len(raws)
        good = {i for i in range(n) if i not in failed}
        for i in failed:
            if good:
                # The next good slot after i in batch order (cyclic).
                donor = raws[next((i + d) % n for d in range(1, n) if (i + d) % n in good)]
            else:
                donor = self._donor_ahead(s, first_position + n)
            out[i] = self._prepare(donor, seeds[i])
        return out

    def _donor_ahead(self, s: int, position: int) -> RawSample:
        """First decodable sample of stream ``s`` from ``position`` on (read silently, not consumed)."""
        last_error: BaseException | None = None
        ahead = self._stream(s).samples(skip=position, report=False)
        for _, candidate in zip(range(self.max_consecutive_failures), ahead):
            try:
                self._prepare(candidate, 0)
                return candidate
            except DECODE_ERRORS as exc:
                last_error = exc
        raise RuntimeError(
            f"a whole batch and the next {self.max_consecutive_failures} samples of {self.shard_set.spec!r} failed "
            f"to decode or transform (last error: {last_error!r}); this points at a broken transform or data "
            "source rather than a few corrupt files"
        ) from last_error

    def __iter__(self) -> Iterator[tuple[int, Any, list]]:
        from dinoscale.data.loader import collate_step

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        S = self.streams_per_rank
        if S % workers:
            raise ValueError(f"streams_per_rank={S} must be a multiple of num_workers={workers}")
        streams: dict[int, Iterator[RawSample]] = {}
        step = self.start_step + worker
        while True:
            s = step % S
            first_position = (step // S) * self.batch_size
            with collect_skips() as events:
                if s not in streams:
                    streams[s] = self._stream(s).samples(skip=self.consumed(s))
                raws = [next(streams[s]) for _ in range(self.batch_size)]
                samples = self._batch(s, raws, first_position)
                batch = collate_step(self.collate_fn, samples, seed=self.seed, step=step, rank=self.rank)
            yield step, batch, list(events)
            step += workers


def build_shard_steps(
    source: str | ShardDataset,
    transform: Callable | None,
    collate_fn: Callable,
    *,
    batch_size_per_rank: int,
    num_workers: int,
    seed: int,
    start_step: int,
    rank: int,
    world_size: int,
    streams_per_rank: int | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    max_consecutive_failures: int = 64,
    image_format: str | None = None,
) -> ShardSteps:
    """The step source behind ``build_pretrain_loader`` for shards (see :class:`ShardSteps`).

    ``streams_per_rank`` (default ``max(1, num_workers)``) must be a multiple of
    ``num_workers``; the batches depend on it and not on ``num_workers``. ``image_format``
    defaults to the ShardDataset's, or ``"pil"`` for a spec string.
    """
    if isinstance(source, ShardDataset):
        shard_set, fmt = source.shard_set, source.image_format
    else:
        shard_set, fmt = resolve_shards(source), "pil"
    image_format = image_format or fmt
    if image_format not in ("pil", "bytes"):
        raise ValueError(f"image_format must be 'pil' or 'bytes', got {image_format!r}")
    streams = streams_per_rank if streams_per_rank is not None else max(1, num_workers)
    if streams < 1 or streams % max(1, num_workers):
        raise ValueError(
            f"streams_per_rank={streams} must be a positive multiple of num_workers={num_workers} "
            "(each worker owns whole streams, which keeps batches independent of num_workers)"
        )
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    return ShardSteps(
        shard_set,
        transform,
        collate_fn,
        image_format=image_format,
        batch_size_per_rank=batch_size_per_rank,
        num_workers=num_workers,
        seed=seed,
        start_step=start_step,
        rank=rank,
        world_size=world_size,
        streams_per_rank=streams,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        max_consecutive_failures=max_consecutive_failures,
    )
