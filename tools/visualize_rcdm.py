#!/usr/bin/env python
"""What a representation keeps: RCDM samples (as in MSN) conditioned on several frozen backbones.

    python tools/visualize_rcdm.py --backbone random --backbone outputs/quickstart --output-dir viz/rcdm
    python tools/visualize_rcdm.py --backbone random --backbone outputs/quickstart --output-dir viz/rcdm \\
        --decoder viz/rcdm/decoders/0_random_init --decoder viz/rcdm/decoders/1_quickstart   # reuse, no training

For every ``--backbone`` a representation-conditioned diffusion decoder (``dinoscale/viz/rcdm.py``) is trained
on the backbone's frozen CLS representations of the first ``--train-samples`` training images (or loaded
with ``--decoder``, one per backbone in the same order, ``-`` to train that one), then sampled ``--samples``
times for each test image (the first test image of each of the first ``--images`` classes), conditioned on
the backbone's representation of it. Sample ``s`` starts from the same noise in every row and for every
backbone, so what changes along a column is the representation alone.

``--backbone``:

* a training output directory (``config.yaml`` and ``export/teacher_backbone.*`` or a checkpoint);
* ``random``: the network the first run directory among the backbones started from (its architecture, its
  ``train.seed``: the final kNN's ``random_init``); ``random:RUN_DIR`` or ``random:CONFIG.yaml`` names it;
* ``ARCH[=WEIGHTS]``: a ``dinoscale.hub`` name or factory architecture (random weights without ``=WEIGHTS``).

Writes ``OUTPUT_DIR/rcdm.png`` (per test image a row: the image, then per backbone its labelled group of
samples) and each trained decoder to ``OUTPUT_DIR/decoders/K_LABEL/`` (``decoder.safetensors`` +
``decoder.json``). Seeded: the same command gives the same picture on the same machine.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from dinoscale.config import load_config  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.backbones import load_backbone  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402
from dinoscale.viz import rcdm  # noqa: E402

logger = logging.getLogger("visualize_rcdm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", required=True, metavar="SPEC",
                        help="run directory, random[:RUN_DIR|CONFIG] or ARCH[=WEIGHTS]; repeat for each backbone")
    parser.add_argument("--label", action="append", default=[], help="group header per backbone (default: from SPEC)")
    parser.add_argument("--decoder", action="append", default=[], metavar="DIR",
                        help="a saved decoder per backbone (same order; '-' trains that one)")
    parser.add_argument("--output-dir", default="viz/rcdm")
    parser.add_argument("--train", default="fashion-mnist:train", help="decoder training images")
    parser.add_argument("--test", default="fashion-mnist:test", help="images whose representations are sampled")
    parser.add_argument("--train-samples", type=int, default=20000, help="the first N training images")
    parser.add_argument("--images", type=int, default=10,
                        help="test images: the first one of each of the first N classes")
    parser.add_argument("--samples", type=int, default=4, help="samples per test image and backbone")
    parser.add_argument("--steps", type=int, default=600, help="decoder training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="UNet width per level")
    parser.add_argument("--image-size", type=int, default=28, help="decoder image side (28: Fashion-MNIST as is)")
    parser.add_argument("--backbone-image-size", type=int, default=None,
                        help="backbone input side (default: each backbone's own img_size)")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scale", type=int, default=3, help="pixels per image pixel in the picture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--autocast", default="auto", help="decoder autocast: auto (bf16 where native) | bf16 | fp32")
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args(argv)
    for name in ("label", "decoder"):
        given = getattr(args, name)
        if given and len(given) != len(args.backbone):
            parser.error(f"--{name} given {len(given)} times for {len(args.backbone)} backbones")
    return args


def _is_run_dir(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.yaml").is_file()


def random_init(source: str) -> torch.nn.Module:
    """The network a run (directory or config file) started from: its model, seeded with its ``train.seed``."""
    path = Path(source)
    cfg = load_config(str(path / "config.yaml") if path.is_dir() else str(path))
    torch.manual_seed(cfg.train.seed)
    model = build_backbone(cfg.model, drop_path_rate=0.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_backbone(spec: str, specs: list[str]) -> tuple[torch.nn.Module, str]:
    """(frozen backbone, default label) of one ``--backbone`` SPEC (``specs``: all of them, for ``random``)."""
    if spec == "random" or spec.startswith("random:"):
        source = spec.partition(":")[2]
        if not source:
            runs = [s for s in specs if _is_run_dir(s)]
            if not runs:
                raise SystemExit("--backbone random needs a run directory among the backbones; or use random:RUN_DIR")
            source = runs[0]
        return random_init(source), "random init"
    if _is_run_dir(spec):
        return load_backbone(weights=spec), Path(spec).resolve().name
    arch, _, weights = spec.partition("=")
    return load_backbone(arch, weights or None), spec


def first_of_each_class(dataset, num_classes: int) -> list[int]:
    """Dataset positions of the first sample of classes 0, 1, ... (up to ``num_classes`` classes present)."""
    targets, samples = getattr(dataset, "targets", None), getattr(dataset, "samples", None)
    if targets is not None:  # Fashion-MNIST
        labels = [int(t) for t in targets]
    elif samples is not None:  # an image folder: (path, label) pairs, no image read
        labels = [int(label) for _, label in samples]
    else:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    first: dict[int, int] = {}
    for i, label in enumerate(labels):
        first.setdefault(int(label), i)
    return [first[c] for c in sorted(first)[:num_classes]]


def decoder_images_of(dataset, indices: list[int], image_size: int) -> torch.Tensor:
    """(N, 1, S, S) decoder images in [-1, 1] of the samples ``indices`` (any size, PIL or tensor)."""
    from dinoscale.eval.transforms import to_uint8_or_float_chw

    return torch.cat([rcdm.decoder_images(to_uint8_or_float_chw(dataset[i][0])[None], image_size) for i in indices])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "backbone"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device(args.device)
    autocast_dtype = None if args.autocast == "auto" else args.autocast
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_set = open_dataset(args.train)
    train_indices = list(range(min(args.train_samples, len(train_set))))
    test_set = open_dataset(args.test)
    test_indices = first_of_each_class(test_set, args.images)
    real = decoder_images_of(test_set, test_indices, args.image_size)
    train_images = None  # decoded once, shared by every decoder trained

    groups, labels = [], []
    for k, spec in enumerate(args.backbone):
        backbone, label = resolve_backbone(spec, args.backbone)
        label = args.label[k] if args.label else label
        backbone = backbone.to(device)
        backbone_size = args.backbone_image_size or rcdm.backbone_input_size(backbone)
        represent = dict(image_size=backbone_size, device=device)
        decoder_dir = args.decoder[k] if args.decoder else "-"
        if decoder_dir != "-":
            decoder, meta = rcdm.load_decoder(decoder_dir)
            if decoder.cond_dim != backbone.embed_dim:
                raise SystemExit(
                    f"{decoder_dir} expects {decoder.cond_dim}-d representations, {spec} gives {backbone.embed_dim}"
                )
            if decoder.image_size != args.image_size:
                raise SystemExit(
                    f"{decoder_dir} makes {decoder.image_size} px images, --image-size is {args.image_size}"
                )
            if meta.get("backbone") not in (None, spec):
                logger.warning(
                    "%s was trained on backbone %s, now conditioned on %s", decoder_dir, meta["backbone"], spec
                )
            decoder = decoder.to(device)
            logger.info("[%s] decoder %s (%s steps)", label, decoder_dir, meta.get("steps", "?"))
        else:
            start = time.perf_counter()
            reps = rcdm.backbone_representations(backbone, Subset(train_set, train_indices), **represent)
            logger.info("[%s] %d representations (%d-d) in %.0f s", label, *reps.shape, time.perf_counter() - start)
            if train_images is None:
                train_images = decoder_images_of(train_set, train_indices, args.image_size)
            torch.manual_seed(args.seed)
            decoder = rcdm.RCDMDecoder(
                reps.shape[1], image_size=args.image_size, block_out_channels=args.channels,
                attention_levels=[False] * (len(args.channels) - 1) + [True],
                attention_head_dim=min(32, args.channels[-1]),
            ).to(device)
            start = time.perf_counter()
            losses = rcdm.train_decoder(
                decoder, train_images.to(device), reps.to(device), steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, autocast_dtype=autocast_dtype, log_every=args.log_every,
            )
            seconds = time.perf_counter() - start
            tail = losses[-min(len(losses), 50):]
            meta = {
                "backbone": spec, "label": label, "backbone_image_size": backbone_size, "representation": "cls",
                "train": args.train, "train_samples": len(train_indices), "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "final_loss": sum(tail) / len(tail), "seconds_per_step": seconds / args.steps,
            }
            saved = rcdm.save_decoder(decoder, out_dir / "decoders" / f"{k}_{slug(label)}", meta)
            logger.info("[%s] trained %d steps in %.0f s (%.2f s/step), final loss %.4f -> %s",
                        label, args.steps, seconds, seconds / args.steps, meta["final_loss"], saved)
        test_reps = rcdm.backbone_representations(backbone, Subset(test_set, test_indices), **represent)
        start = time.perf_counter()
        groups.append(rcdm.samples_per_image(
            decoder, test_reps, args.samples, seed=args.seed, num_inference_steps=args.sampling_steps,
            autocast_dtype=autocast_dtype,
        ))
        logger.info("[%s] %d samples in %.0f s", label, groups[-1].shape[0] * args.samples, time.perf_counter() - start)
        labels.append(label)
        del backbone, decoder

    picture, _ = rcdm.sample_grid(real, groups, labels, scale=args.scale, real_label="test image")
    path = out_dir / "rcdm.png"
    picture.save(path)
    print(f"wrote {path} ({len(test_indices)} test images x {len(groups)} backbones x {args.samples} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
