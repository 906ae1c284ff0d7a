#!/usr/bin/env python
"""Weighted cosine kNN classification (DINO protocol) of a frozen backbone's CLS features.

    python tools/eval_knn.py --arch dinov2_vits14 --weights dinov2_vits14_pretrain.pth \\
        --train /data/imagenet/train --test /data/imagenet/val --output-json knn.json
    python tools/eval_knn.py --weights outputs/run --train fashion-mnist:train --test fashion-mnist:test \\
        --max-train 10000 --crop-ratio 1.0
    python tools/eval_knn.py --pixels --train fashion-mnist:train --test fashion-mnist:test --image-size 28

``--pixels`` runs the same kNN on raw (transformed, flattened) pixels: the baseline any backbone
should beat. Datasets: ``fashion-mnist[:train|:test]`` or image folders with one sub-folder per class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from dinoscale import distributed  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.backbones import add_backbone_args, backbone_from_args  # noqa: E402
from dinoscale.eval.extract import extract_features  # noqa: E402
from dinoscale.eval.knn import knn_classify  # noqa: E402
from dinoscale.eval.transforms import eval_transform  # noqa: E402


class Pixels(torch.nn.Module):
    """The identity 'backbone' of the raw-pixel baseline: flattened normalised pixels."""

    def __init__(self, patch_size: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--pixels", action="store_true", help="raw-pixel baseline instead of a backbone")
    parser.add_argument("--train", default="fashion-mnist:train", help="labelled memory bank dataset")
    parser.add_argument("--test", default="fashion-mnist:test", help="labelled query dataset")
    parser.add_argument("--max-train", type=int, default=None, help="only the first N training samples")
    parser.add_argument("--max-test", type=int, default=None, help="only the first N test samples")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--image-size", type=int, default=224, help="crop size (rounded to the patch size)")
    parser.add_argument("--crop-ratio", type=float, default=224 / 256, help="crop / resize ratio (1.0: no border cut)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--autocast", default="auto", help="auto | bf16 | fp16 | fp32")
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.init_distributed()
    device = resolve_device(args.device)
    model = Pixels() if args.pixels else backbone_from_args(args)
    model = model.to(device)
    transform = eval_transform(args.image_size, model.patch_size, crop_ratio=args.crop_ratio)
    train_set = open_dataset(args.train, transform=transform, max_samples=args.max_train)
    test_set = open_dataset(args.test, transform=transform, max_samples=args.max_test)
    kw = dict(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        autocast_dtype="fp32" if args.pixels else (None if args.autocast == "auto" else args.autocast),
        progress=not args.no_progress,
    )
    start = time.time()
    train = extract_features(model, train_set, **kw)
    test = extract_features(model, test_set, **kw)
    results = knn_classify(
        train["cls"], train["labels"], test["cls"], test["labels"], ks=args.ks, temperature=args.temperature
    )
    if distributed.is_main_process():
        print(f"kNN ({'pixels' if args.pixels else args.arch or args.config or args.weights}), "
              f"{train['cls'].shape[0]} train / {test['cls'].shape[0]} test, T={args.temperature}")
        for k, accs in results.items():
            print(f"  k={k:<4d} top-1 {accs['top1']:6.2f}%  top-5 {accs['top5']:6.2f}%")
        skipped = train["num_skipped"] + test["num_skipped"]
        if skipped:
            print(f"  skipped {skipped} unreadable image(s)")
        if args.output_json:
            report = {
                "backbone": {"pixels": args.pixels, "arch": args.arch, "weights": args.weights, "config": args.config},
                "train": args.train,
                "test": args.test,
                "num_train": int(train["cls"].shape[0]),
                "num_test": int(test["cls"].shape[0]),
                "num_skipped": int(skipped),
                "image_size": transform.crop_size,
                "temperature": args.temperature,
                "results": {str(k): v for k, v in results.items()},
                "seconds": round(time.time() - start, 1),
            }
            Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_json).write_text(json.dumps(report, indent=2))
            print(f"wrote {args.output_json}")
    distributed.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
