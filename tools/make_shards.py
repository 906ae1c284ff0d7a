"""Write a dataset as WebDataset shards with an index.json (see dinoscale/data/sources/shards.py for the layout).

Examples:
    python tools/make_shards.py /data/imagenet/train /data/imagenet-shards --workers 8
    python tools/make_shards.py fashion-mnist /data/fmnist-shards --max-samples-per-shard 5000
    python tools/make_shards.py files.txt /data/shards --jpeg-quality 90 --max-bytes-per-shard 500M

SOURCE is an image folder (class sub-folders -> labels, flat -> unlabeled), ``fashion-mnist`` or
``fashion-mnist:PATH`` (both splits, written to OUTPUT_DIR/train and OUTPUT_DIR/test), or a list file
with one image path per line, optionally followed by a label (int or class name; tab or space separated).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoscale.data.shard_writer import write_shards  # noqa: E402

_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> float:
    """'500M' -> 5e8; plain numbers are bytes."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1000000, 500M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value * _UNITS[unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="image folder, fashion-mnist[:PATH] or a list file")
    parser.add_argument("output_dir")
    parser.add_argument("--pattern", default="shard-%06d.tar", help="shard file name pattern (printf style)")
    parser.add_argument("--max-samples-per-shard", type=int, default=10000)
    parser.add_argument("--max-bytes-per-shard", type=parse_size, default=1e9, help="e.g. 1G, 500M")
    parser.add_argument(
        "--jpeg-quality", type=int, default=None, help="re-encode as JPEG with this quality (default: keep bytes)"
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pre-write shuffle")
    parser.add_argument("--workers", type=int, default=1, help="processes that read/encode images")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples of each split")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        results = write_shards(
            args.source,
            args.output_dir,
            pattern=args.pattern,
            max_samples_per_shard=args.max_samples_per_shard,
            max_bytes_per_shard=args.max_bytes_per_shard,
            jpeg_quality=args.jpeg_quality,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            num_workers=args.workers,
            limit=args.limit,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        parser.error(str(exc))
    for split, index in results.items():
        where = Path(args.output_dir) / split if split else Path(args.output_dir)
        print(
            f"{where}: {index['total']} samples in {len(index['shards'])} shards"
            + (f", {index['skipped']} unreadable skipped" if index["skipped"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
