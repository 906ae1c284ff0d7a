#!/usr/bin/env python
"""Attention maps and patch-feature PCA pictures of a backbone.

    python tools/visualize.py --arch dinov2_vits14_reg --weights dinov2_vits14_reg4_pretrain.pth \\
        --images skimage --output-dir viz/ --image-size 448
    python tools/visualize.py --weights outputs/run --images photo1.jpg photo2.png --what pca

``--images``: image files and/or scikit-image sample names; ``skimage`` (the default) stands for
astronaut, chelsea, coffee and rocket. Every image is resized (shorter side ``--image-size``) and
cropped to a multiple of the patch size. Writes, per image, ``NAME_attention.png`` (figure),
``NAME_attn_mean.png`` and ``NAME_attn_headK.png`` (image-sized maps), ``NAME_pca.png`` and
``NAME_pca_figure.png``, and ``pca_grid.png`` for the PCA fitted jointly over all images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.backbones import add_backbone_args, backbone_from_args  # noqa: E402
from dinoscale.viz.attention import load_images, save_attention_maps  # noqa: E402
from dinoscale.viz.pca import save_pca_images  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    parser.add_argument("--images", nargs="+", default=["skimage"], help="files and/or skimage sample names")
    parser.add_argument("--output-dir", default="viz")
    parser.add_argument("--image-size", type=int, default=448, help="shorter side (rounded to the patch size)")
    parser.add_argument("--what", choices=("attention", "pca", "both"), default="both")
    parser.add_argument("--pca-threshold", type=float, default=0.5, help="foreground threshold on the 1st component")
    parser.add_argument("--pca-sign", choices=("auto", "keep", "flip"), default="auto")
    parser.add_argument("--attn-threshold", type=float, default=None, help="keep this attention mass (e.g. 0.6)")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    model = backbone_from_args(args).to(device)
    images = load_images(args.images)
    out_dir = Path(args.output_dir)
    written = 0
    if args.what in ("attention", "both"):
        for name, image in images:
            res = save_attention_maps(
                model, image, out_dir, name, image_size=args.image_size, threshold=args.attn_threshold
            )
            written += 2 + len(res["paths"]["heads"])
    if args.what in ("pca", "both"):
        res = save_pca_images(
            model, images, out_dir, image_size=args.image_size, threshold=args.pca_threshold, sign=args.pca_sign
        )
        written += len(res["paths"]["pca"]) + len(res["paths"]["figures"]) + 1
    print(f"wrote {written} PNG files for {len(images)} image(s) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
