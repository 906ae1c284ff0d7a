"""Feature extraction on CPU: fp32 against bf16 autocast (the default where the CPU has native bf16).

    python benchmarks/extract_cpu.py                      # ViT-S/14 at 224 px, 128 images, batch 32
    python benchmarks/extract_cpu.py --arch vit_base --images 64

Runs ``dinoscale.eval.extract.extract_features`` (the code behind ``tools/extract_features.py`` and the
kNN / linear evaluations) over the same random images twice per dtype, interleaved, and prints images/s for
each (the better of the two passes), the speed-up, and how far the bf16 [CLS] features are from the fp32
ones (cosine similarity, and whether a 20-NN search over the set finds the same neighbours).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale.device import cpu_supports_bf16, inference_autocast_dtype  # noqa: E402
from dinoscale.eval.extract import extract_features  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", choices=("vit_small", "vit_base", "vit_large"))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_backbone(args.arch, patch_size=14, img_size=518).eval()
    images = torch.rand(args.images, 3, args.size, args.size)
    data = TensorDataset(images, torch.zeros(args.images, dtype=torch.long))
    default = inference_autocast_dtype(torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"native bf16: {cpu_supports_bf16()}, default autocast: {default}; {args.arch}/14, "
          f"{args.images} images of {args.size} px, batch {args.batch}")

    best, feats = {"fp32": float("inf"), "bf16": float("inf")}, {}
    extract_features(model, data, batch_size=args.batch, autocast_dtype="bf16", progress=False)  # warm-up
    for _ in range(2):
        for dtype in ("fp32", "bf16"):
            start = time.perf_counter()
            out = extract_features(model, data, batch_size=args.batch, autocast_dtype=dtype, progress=False)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
            feats[dtype] = out["cls"]
    for dtype in ("fp32", "bf16"):
        print(f"{dtype}: {args.images / best[dtype]:7.2f} img/s")
    print(f"bf16 / fp32 speed-up: {best['fp32'] / best['bf16']:.2f}x")

    a, b = (torch.nn.functional.normalize(feats[k].float(), dim=1) for k in ("fp32", "bf16"))
    cosine = (a * b).sum(1)
    k = min(20, args.images - 1)
    same = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in
            zip((a @ a.T).topk(k + 1).indices[:, 1:], (b @ b.T).topk(k + 1).indices[:, 1:])]
    print(f"[CLS] cosine(bf16, fp32): min {cosine.min():.5f}, mean {cosine.mean():.5f}; "
          f"{k}-NN overlap: {100 * sum(same) / len(same):.1f}%")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
