#!/usr/bin/env python
"""Train BEiT's visual tokenizer, a discrete VAE (``dinoscale.tokenizers.dvae``), on the data a BEiT run uses.

    python tools/train_tokenizer.py --config configs/methods/beit_fmnist.yaml        # what the BEiT config reads
    python tools/train_tokenizer.py --dataset fashion-mnist:train --image-size 28 --patch-size 4 \\
        --vocab-size 512 --steps 2000 --output outputs/tokenizers/dvae_fmnist

With ``--config`` (a BEiT config) the data (``train.dataset``), the views (``beit.crop_scale``; the size the
tokenizer sees, ``beit.tokenizer_input_size`` or ``crops.global_crops_size``), the patch size (one token per ViT
patch), the seed and the output directory (``beit.tokenizer``) come from it; explicit options override them.
Without it the defaults are the Fashion-MNIST recipe's (``configs/methods/beit_fmnist.yaml``).

The images are BEiT's views (``dinoscale.data.transforms.single_crop``: RandomResizedCrop, flip, ImageNet
normalisation), read through ``dinoscale.data.open.open_dataset``. The loss (``dinoscale.losses.dvae``) is the
reconstruction error through the Gumbel-softmax relaxation, its temperature annealed with a cosine from
``--temperature-start`` to ``--temperature-end`` over ``--anneal-steps`` (60% of the steps by default), plus
``--kl-weight`` (raised linearly over ``--kl-warmup-steps``) times the KL divergence to the uniform prior; AdamW
with a linear warm-up and a cosine decay. At the end it measures the hard-token reconstruction
(``decoder(tokens(x))``, no noise) on the first ``--eval-images`` images of the dataset (whole images, no
augmentation) and how many of the tokens they use, and writes ``dvae.safetensors`` + ``dvae.json`` (constructor
arguments, options, final losses) to the output directory.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from dinoscale.config import load_config  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.data.transforms.single_crop import RandomResizedCropFlip  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.transforms import eval_transform  # noqa: E402
from dinoscale.losses.dvae import DVAELoss  # noqa: E402
from dinoscale.tokenizers.dvae import DiscreteVAE, gumbel_temperature, save_tokenizer  # noqa: E402

# The Fashion-MNIST recipe (configs/methods/beit_fmnist.yaml's data and tokenizer path) when there is no --config.
DEFAULTS = dict(dataset="fashion-mnist:train", image_size=28, patch_size=4, crop_scale=(0.4, 1.0), seed=0,
                output="./outputs/tokenizers/dvae_fmnist")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a BEiT config: data, sizes, patch size, seed and output from it")
    parser.add_argument("--dataset", help=f"dataset spec (default: {DEFAULTS['dataset']})")
    parser.add_argument("--image-size", type=int, help=f"side of the views (default: {DEFAULTS['image_size']})")
    parser.add_argument("--patch-size", type=int, help=f"pixels per token cell (default: {DEFAULTS['patch_size']})")
    parser.add_argument("--crop-scale", type=float, nargs=2, help="RandomResizedCrop area range")
    parser.add_argument("--output", help=f"output directory (default: {DEFAULTS['output']})")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--vocab-size", type=int, default=512, help="K visual tokens")
    parser.add_argument("--hidden-dim", type=int, default=32)
    parser.add_argument("--codebook-dim", type=int, default=32)
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--reconstruction", choices=["mse", "l1"], default="mse")
    parser.add_argument("--kl-weight", type=float, default=1e-2, help="beta of the KL term once warmed up")
    parser.add_argument("--kl-warmup-steps", type=int, default=500, help="beta rises linearly from 0 over these")
    parser.add_argument("--temperature-start", type=float, default=1.0)
    parser.add_argument("--temperature-end", type=float, default=1.0 / 16)
    parser.add_argument("--anneal-steps", type=int,
                        help="steps of the temperature cosine (default: 60%% of --steps; the rest at the final one)")
    parser.add_argument("--eval-images", type=int, default=2048)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --output")
    args = parser.parse_args(argv)
    return resolve_defaults(args)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset data options from ``--config`` (a BEiT config), else from :data:`DEFAULTS`."""
    from_config = {}
    if args.config:
        cfg = load_config(args.config)
        size = cfg.crops.global_crops_size
        if size % cfg.model.patch_size:
            raise SystemExit(f"{args.config}: crops.global_crops_size {size} is not a multiple of model.patch_size")
        grid = size // cfg.model.patch_size
        image_size = cfg.beit.tokenizer_input_size or size
        if image_size % grid:
            raise SystemExit(f"{args.config}: the tokenizer's input size {image_size} cannot be cut into the ViT's "
                             f"{grid}x{grid} grid")
        if not cfg.beit.tokenizer:
            raise SystemExit(f"{args.config} sets no beit.tokenizer: pass --output")
        from_config = dict(dataset=cfg.train.dataset, image_size=image_size, patch_size=image_size // grid,
                           crop_scale=tuple(cfg.beit.crop_scale), seed=cfg.train.seed, output=cfg.beit.tokenizer)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, from_config.get(key, default))
    if args.image_size % args.patch_size:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    return args


def batches(dataset, batch_size: int, num_workers: int, seed: int):
    """Endless training batches of views: reshuffled every epoch (map-style data), seeded."""
    generator = torch.Generator().manual_seed(seed)
    shuffle = not isinstance(dataset, IterableDataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, num_workers=num_workers,
                        generator=generator, persistent_workers=num_workers > 0)
    while True:
        for images, _ in loader:
            yield images


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``--lr``, then a cosine to ``--min-lr``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: DiscreteVAE, images: torch.Tensor, batch_size: int, reconstruction: str) -> dict[str, float]:
    """Hard-token reconstruction error (no Gumbel noise) on ``images``, and the tokens' usage."""
    model.eval()
    errors, counts = [], torch.zeros(model.vocab_size, dtype=torch.long)
    for chunk in images.split(batch_size):
        error = model.reconstruct(chunk) - chunk
        errors.append((error.square() if reconstruction == "mse" else error.abs()).mean(dim=(1, 2, 3)))
        counts += torch.bincount(model.encoder.tokens(chunk).flatten().cpu(), minlength=model.vocab_size)
    model.train()
    p = counts.float() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"reconstruction_hard": torch.cat(errors).mean().item(), "tokens_used": int((counts > 0).sum()),
            "token_perplexity": math.exp(entropy)}


def eval_images(spec: str, image_size: int, patch_size: int, n: int) -> torch.Tensor:
    """The first ``n`` images of the dataset, whole (resized, no crop or flip), normalised like the views."""
    dataset = open_dataset(spec, transform=eval_transform(image_size, patch_size, crop_ratio=1.0), max_samples=n)
    images = []
    for image, _ in dataset:
        images.append(image)
        if len(images) == n:
            break
    return torch.stack(images)


def train(args: argparse.Namespace) -> dict:
    """Train the dVAE as ``args`` say, save it to ``args.output``; returns what ``dvae.json`` records."""
    output = Path(args.output)
    if (output / "dvae.safetensors").exists() and not args.overwrite:
        raise SystemExit(f"{output} already holds a tokenizer: pass --overwrite to replace it")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = DiscreteVAE(in_chans=3, patch_size=args.patch_size, vocab_size=args.vocab_size,
                        hidden_dim=args.hidden_dim, codebook_dim=args.codebook_dim,
                        num_res_blocks=args.num_res_blocks).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = DVAELoss(args.reconstruction)
    dataset = open_dataset(args.dataset, transform=RandomResizedCropFlip(args.image_size, scale=args.crop_scale))
    held_out = eval_images(args.dataset, args.image_size, args.patch_size, args.eval_images).to(device)
    anneal = args.anneal_steps if args.anneal_steps is not None else round(0.6 * args.steps)
    print(f"dVAE {model.args} ({sum(p.numel() for p in model.parameters())} parameters) on {args.dataset}, "
          f"{args.image_size}-px views -> {args.image_size // args.patch_size}^2 tokens, {args.steps} steps of "
          f"{args.batch_size} on {device}", flush=True)
    start, window = time.time(), []
    stream = batches(dataset, args.batch_size, args.num_workers, args.seed)
    for step in range(args.steps):
        images = next(stream).to(device, non_blocking=True)
        tau = gumbel_temperature(step, anneal, args.temperature_start, args.temperature_end)
        beta = args.kl_weight * min(1.0, (step + 1) / args.kl_warmup_steps) if args.kl_warmup_steps else args.kl_weight
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        reconstruction, logits = model(images, temperature=tau)
        loss, terms = criterion(reconstruction, images, logits, kl_weight=beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append([loss.item(), terms["reconstruction"].item(), terms["kl"].item()])
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = [sum(col) / len(window) for col in zip(*window)]
            print(f"step {step + 1}/{args.steps}  loss {mean[0]:.4f}  reconstruction {mean[1]:.4f}  kl {mean[2]:.3f}"
                  f"  tau {tau:.3f}  beta {beta:.2g}  {time.time() - start:.0f}s", flush=True)
            window = []
    final = evaluate(model, held_out, args.batch_size, args.reconstruction)
    record = {
        "data": {"dataset": args.dataset, "image_size": args.image_size, "crop_scale": list(args.crop_scale),
                 "normalisation": "ImageNet mean/std (dinoscale.data.transforms.normalize)"},
        "training": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "min_lr", "warmup_steps",
                                                   "weight_decay", "reconstruction", "kl_weight", "kl_warmup_steps",
                                                   "temperature_start", "temperature_end", "seed")},
        "final": {"reconstruction_soft": mean[1], "kl": mean[2], **final, "eval_images": len(held_out),
                  "wall_time_s": round(time.time() - start, 1)},
    }
    save_tokenizer(model.cpu(), output, **record)
    print(f"hard-token reconstruction {final['reconstruction_hard']:.4f} ({args.reconstruction}) on "
          f"{len(held_out)} images, {final['tokens_used']}/{args.vocab_size} tokens used (perplexity "
          f"{final['token_perplexity']:.1f}); wrote {output}", flush=True)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
