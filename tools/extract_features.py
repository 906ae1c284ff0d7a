#!/usr/bin/env python
"""Embed a dataset with a frozen backbone and save the features.

    python tools/extract_features.py --arch dinov2_vits14 --weights dinov2_vits14_pretrain.pth \\
        --data /data/images --output feats.safetensors --image-size 224
    python tools/extract_features.py --weights outputs/run --data fashion-mnist:test --output fm.npy

``--data``: an image folder (recursive; labels from its first-level sub-folders, -1 when flat),
``fashion-mnist[:train|:test]``, or WebDataset shards. Outputs:

* ``.safetensors``: tensors ``cls`` (N, D), ``labels`` (N,), ``indices`` (N,) (dataset positions),
  ``patch_mean`` (N, D) with ``--pooled-patches``; the metadata holds ``file_names`` (a JSON list),
  ``num_skipped`` and the extraction settings;
* ``.npz``: the same arrays plus ``file_names``;
* ``.npy``: ``cls`` in the named file, and ``<stem>_labels.npy``, ``<stem>_indices.npy``,
  ``<stem>_patch_mean.npy`` and ``<stem>_files.json`` beside it.

Unreadable images are skipped and counted. Runs under ``torchrun`` too (every rank embeds a slice;
rank 0 writes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from dinoscale import distributed  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.backbones import add_backbone_args, backbone_from_args  # noqa: E402
from dinoscale.eval.extract import extract_features, sample_names  # noqa: E402
from dinoscale.eval.transforms import eval_transform  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--data", required=True, help="image folder, fashion-mnist[:split] or shards")
    parser.add_argument("--output", required=True, help="output file: .safetensors, .npz or .npy")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (rounded to the patch size)")
    parser.add_argument("--crop-ratio", type=float, default=224 / 256, help="crop / resize ratio (1.0: no border cut)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--autocast", default="auto", help="auto | bf16 | fp16 | fp32")
    parser.add_argument("--pooled-patches", action="store_true", help="also save the mean patch token")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N samples")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def save_features(path: Path, out: dict, names: list, metadata: dict) -> list:
    """Write the features in the format given by the file ending; returns the files written."""
    tensors = {k: out[k].contiguous() for k in ("cls", "patch_mean", "labels", "indices") if k in out}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {k: str(v) for k, v in metadata.items()}
        meta["file_names"] = json.dumps(names)  # safetensors holds tensors only; names go in the metadata
        save_file(tensors, str(path), metadata=meta)
        return [path]
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()}, file_names=np.array(names, dtype=str))
        return [path]
    if path.suffix == ".npy":
        written = [path]
        np.save(path, tensors.pop("cls").numpy())
        for key, value in tensors.items():
            sibling = path.with_name(f"{path.stem}_{key}.npy")
            np.save(sibling, value.numpy())
            written.append(sibling)
        files = path.with_name(f"{path.stem}_files.json")
        files.write_text(json.dumps({"file_names": names, **metadata}, indent=1))
        written.append(files)
        return written
    raise ValueError(f"unsupported output {path}: use .safetensors, .npz or .npy")


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".safetensors", ".npz", ".npy"):
        raise SystemExit(f"--output must end in .safetensors, .npz or .npy, got {output}")
    distributed.init_distributed()
    device = resolve_device(args.device)
    model = backbone_from_args(args).to(device)
    transform = eval_transform(args.image_size, model.patch_size, crop_ratio=args.crop_ratio)
    dataset = open_dataset(args.data, transform=transform, max_samples=args.max_samples)
    out = extract_features(
        model,
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        autocast_dtype=None if args.autocast == "auto" else args.autocast,
        pooled_patches=args.pooled_patches,
        progress=not args.no_progress,
    )
    if distributed.is_main_process():
        names = sample_names(dataset, out["indices"])
        metadata = {
            "data": args.data,
            "arch": args.arch or "",
            "weights": args.weights or "",
            "image_size": transform.crop_size,
            "num_skipped": out["num_skipped"],
        }
        written = save_features(output, out, names, metadata)
        print(
            f"embedded {out['cls'].shape[0]} images (dim {out['cls'].shape[1]}), skipped {out['num_skipped']} "
            f"unreadable; wrote {', '.join(str(p) for p in written)}"
        )
    distributed.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
