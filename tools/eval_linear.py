#!/usr/bin/env python
"""Linear probe (DINOv2 protocol) and/or logistic regression on a frozen backbone.

    python tools/eval_linear.py --arch dinov2_vits14 --weights dinov2_vits14_pretrain.pth \\
        --train /data/imagenet/train --test /data/imagenet/val --output-json linear.json
    python tools/eval_linear.py --weights outputs/run --train fashion-mnist:train --test fashion-mnist:test \\
        --max-train 10000 --mode both

Linear mode: features of the last 1 and 4 blocks (CLS tokens concatenated), with and without the
average-pooled patch tokens, times a grid of learning rates, all heads trained together on cached
features (SGD momentum 0.9, cosine schedule); the best on validation (``--val``, or a held-out
``--val-fraction`` of train) is evaluated on test. Logreg mode: L2 logistic regression on the CLS
features with C chosen on validation, refit on train + val.
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
from dinoscale.eval.linear import (  # noqa: E402
    DEFAULT_CS,
    DEFAULT_LEARNING_RATES,
    extract_linear_features,
    logistic_regression_probe,
    stratified_split,
    train_linear_probes,
    usable_block_counts,
)
from dinoscale.eval.transforms import eval_transform  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--train", default="fashion-mnist:train")
    parser.add_argument("--val", default=None, help="validation dataset (default: held out from --train)")
    parser.add_argument("--test", default="fashion-mnist:test")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-val", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--mode", choices=("linear", "logreg", "both"), default="linear")
    parser.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--avgpool", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LEARNING_RATES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe-batch-size", type=int, default=256)
    parser.add_argument("--Cs", type=float, nargs="+", default=list(DEFAULT_CS))
    parser.add_argument("--logreg-backend", choices=("auto", "sklearn", "torch"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="crop size (rounded to the patch size)")
    parser.add_argument("--crop-ratio", type=float, default=224 / 256)
    parser.add_argument("--batch-size", type=int, default=64, help="feature extraction batch size")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--autocast", default="auto", help="auto | bf16 | fp16 | fp32")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.init_distributed()
    device = resolve_device(args.device)
    model = backbone_from_args(args).to(device)
    transform = eval_transform(args.image_size, model.patch_size, crop_ratio=args.crop_ratio)
    args.n_last_blocks = usable_block_counts(model, args.n_last_blocks)
    n_blocks = max(args.n_last_blocks) if args.mode != "logreg" else 1
    extract = dict(
        n_last_blocks=n_blocks,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        autocast_dtype=None if args.autocast == "auto" else args.autocast,
        progress=not args.no_progress,
    )
    start = time.time()
    caches = {}
    for split, spec, limit in (("train", args.train, args.max_train), ("val", args.val, args.max_val),
                               ("test", args.test, args.max_test)):
        if spec is not None:
            caches[split] = extract_linear_features(model, open_dataset(spec, transform, max_samples=limit), **extract)
    if "val" not in caches:
        # Hold out once here so the linear probe and logistic regression use the same split.
        tr, va = stratified_split(caches["train"]["labels"], args.val_fraction, args.seed)
        full = caches["train"]
        caches["train"] = {k: full[k][tr] for k in ("cls_blocks", "patch_mean", "labels")}
        caches["val"] = {k: full[k][va] for k in ("cls_blocks", "patch_mean", "labels")}

    report = {
        "backbone": {"arch": args.arch, "weights": args.weights, "config": args.config},
        "train": args.train,
        "val": args.val or f"{args.val_fraction:g} of train",
        "test": args.test,
        "image_size": transform.crop_size,
        "num_skipped": int(sum(c.get("num_skipped", 0) for c in caches.values())),
    }
    main_process = distributed.is_main_process()
    if args.mode in ("linear", "both"):
        avgpool = {"both": (False, True), "yes": (True,), "no": (False,)}[args.avgpool]
        res = train_linear_probes(
            caches["train"], caches["val"], caches["test"],
            n_last_blocks_list=args.n_last_blocks, avgpool_list=avgpool, learning_rates=args.lrs,
            epochs=args.epochs, batch_size=args.probe_batch_size, seed=args.seed, device=device,
        )
        res.pop("best_head")
        res.pop("heads")
        report["linear"] = res
        if main_process:
            print(f"linear probe grid ({len(res['grid'])} heads, val top-1):")
            for row in res["grid"]:
                print(f"  blocks={row['n_last_blocks']} avgpool={str(row['avgpool']):5s} lr={row['lr']:<8g} "
                      f"val {row['val_top1']:6.2f}%")
            best = res["best"]
            print(f"best: blocks={best['n_last_blocks']} avgpool={best['avgpool']} lr={best['lr']:g} -> "
                  f"test top-1 {res['test_top1']:.2f}%  top-5 {res['test_top5']:.2f}%")
    if args.mode in ("logreg", "both"):
        cls = lambda c: c["cls_blocks"][:, -1]  # noqa: E731 - the last block's CLS token
        res = logistic_regression_probe(
            cls(caches["train"]), caches["train"]["labels"], cls(caches["test"]), caches["test"]["labels"],
            val_features=cls(caches["val"]), val_labels=caches["val"]["labels"], Cs=args.Cs,
            backend=args.logreg_backend, seed=args.seed,
        )
        report["logreg"] = res
        if main_process:
            print("logistic regression (val top-1): " + ", ".join(f"C={r['C']:g}: {r['val_top1']:.2f}%" for r in res["grid"]))
            print(f"best C={res['best']['C']:g} -> test top-1 {res['test_top1']:.2f}%  top-5 {res['test_top5']:.2f}%")
    report["seconds"] = round(time.time() - start, 1)
    if main_process and args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output_json}")
    distributed.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
