#!/usr/bin/env python
"""Label-efficient evaluation (MSN's protocol) of a frozen backbone: logistic regression from a few labels.

    python tools/eval_lowshot.py --arch dinov2_vits14 --weights dinov2_vits14_pretrain.pth \\
        --train /data/imagenet/train --test /data/imagenet/val --output lowshot.json
    python tools/eval_lowshot.py --weights outputs/run --train fashion-mnist:train --test fashion-mnist:test \\
        --image-size 28 --crop-ratio 1.0 --shots 1 2 5 13 --percent 1 --draws 5

Features are extracted once (the last block's CLS token, ``--avgpool`` adds the pooled patch tokens); for each
setting (``--shots`` images per class, ``--percent`` of the labels) ``--draws`` seeded class-balanced subsets
each fit an L2 logistic regression on centred, L2-normalised features (``--C``, or the best of ``--Cs`` by
cross-validation on the labelled subset; the test set never chooses), and the test top-1 is reported as mean
and standard deviation over the draws. See ``dinoscale/eval/lowshot.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinoscale import distributed  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.backbones import add_backbone_args, backbone_from_args  # noqa: E402
from dinoscale.eval.linear import extract_linear_features  # noqa: E402
from dinoscale.eval.lowshot import DEFAULT_C, DEFAULT_PERCENTS, DEFAULT_SHOTS, lowshot_probe  # noqa: E402
from dinoscale.eval.transforms import eval_transform  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--train", default="fashion-mnist:train", help="the dataset the labelled images come from")
    parser.add_argument("--test", default="fashion-mnist:test")
    parser.add_argument("--max-train", type=int, default=None, help="only the first N training samples")
    parser.add_argument("--max-test", type=int, default=None, help="only the first N test samples")
    parser.add_argument("--shots", type=int, nargs="*", default=list(DEFAULT_SHOTS), help="labelled images per class")
    parser.add_argument("--percent", type=float, nargs="*", default=list(DEFAULT_PERCENTS),
                        help="percent of the labels, class-balanced")
    parser.add_argument("--draws", type=int, default=3, help="random labelled subsets per setting")
    parser.add_argument("--avgpool", action="store_true", help="concatenate the average-pooled patch tokens")
    parser.add_argument("--C", type=float, default=DEFAULT_C, help="inverse L2 regularisation (one value)")
    parser.add_argument("--Cs", type=float, nargs="+", default=None,
                        help="choose C among these by cross-validation on each labelled subset")
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--logreg-backend", choices=("auto", "sklearn", "torch"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="crop size (rounded to the patch size)")
    parser.add_argument("--crop-ratio", type=float, default=224 / 256)
    parser.add_argument("--batch-size", type=int, default=64, help="feature extraction batch size")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--autocast", default="auto", help="auto | bf16 | fp16 | fp32")
    parser.add_argument("--output", "--output-json", dest="output", default=None, help="write the results (JSON)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.init_distributed()
    device = resolve_device(args.device)
    model = backbone_from_args(args).to(device)
    transform = eval_transform(args.image_size, model.patch_size, crop_ratio=args.crop_ratio)
    extract = dict(n_last_blocks=1, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                   autocast_dtype=None if args.autocast == "auto" else args.autocast, progress=not args.no_progress)
    start = time.time()
    train = extract_linear_features(model, open_dataset(args.train, transform, max_samples=args.max_train), **extract)
    test = extract_linear_features(model, open_dataset(args.test, transform, max_samples=args.max_test), **extract)
    res = lowshot_probe(
        train, test, shots=args.shots, percents=args.percent, draws=args.draws, avgpool=args.avgpool,
        Cs=args.Cs or [args.C], default_C=args.C, cv_folds=args.cv_folds, seed=args.seed,
        backend=args.logreg_backend,
    )
    report = {
        "backbone": {"arch": args.arch, "weights": args.weights, "config": args.config},
        "train": args.train,
        "test": args.test,
        "image_size": transform.crop_size,
        "num_skipped": int(train["num_skipped"] + test["num_skipped"]),
        **res,
        "seconds": round(time.time() - start, 1),
    }
    if distributed.is_main_process():
        print(f"low-shot logistic regression, {res['num_train']} train / {res['num_test']} test, "
              f"{args.draws} draw(s), test top-1 mean +- std:")
        for name, row in res["settings"].items():
            print(f"  {name:>8s} ({row['num_labelled']:6d} labelled): "
                  f"{row['mean_top1']:6.2f} +- {row['std_top1']:.2f}%")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2))
            print(f"wrote {args.output}")
    distributed.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
