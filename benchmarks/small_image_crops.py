"""Small images (Fashion-MNIST, CIFAR sizes): their crops by the resize kernel per crop, or by batched matmuls.

    python benchmarks/small_image_crops.py                # 20 interleaved rounds after 3 untimed ones
    python benchmarks/small_image_crops.py --rounds 40

``dinoscale.data.transforms.geometry.resized_crops`` cuts all crops of an image of at most ``SMALL_IMAGE_PIXELS``
pixels with one matmul and one batched matmul (``_resized_crops_by_matmul``), and those of a larger one with the
antialiased uint8 resize kernel per crop (``resized_crop``). Both forms are timed here on the same boxes (drawn as
the multi-crop transform draws them) of a real photo (scikit-image's astronaut) at each size, one thread,
interleaved, median per round:

* 28 px: the quickstart's crops (2 x 28 px, 4 x 14 px);
* 32 px: CIFAR-sized (2 x 32 px, 8 x 16 px);
* 48 px: the largest size the matmuls are used for (2 x 48 px, 8 x 24 px);
* 64 px: above it, for reference (2 x 64 px, 8 x 32 px).

Printed per size: microseconds per image for each form, kernel / matmul, and how far the two differ (largest
difference in levels, share of pixels that differ). A last line times the decoding of 8-bit grey PNG bytes of the
28 px photo: PIL (open, ``convert("RGB")``, copy to a tensor) against torchvision's decoder as
``decode.decode_for_boxes`` uses it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from dinoscale.data.transforms.decode import _png_to_chw
from dinoscale.data.transforms.geometry import (
    SMALL_IMAGE_PIXELS,
    _resized_crops_by_matmul,
    resized_crop,
    sample_crop_boxes,
)

# image side -> (global size, local size, local count)
CASES = {28: (28, 14, 4), 32: (32, 16, 8), 48: (48, 24, 8), 64: (64, 32, 8)}
BOXES_PER_ROUND = 50


def photo(side: int) -> torch.Tensor:
    """scikit-image's astronaut at ``side`` px: uint8 (3, side, side), a view of (H, W, 3) pixels (as decoded)."""
    from skimage import data as skdata

    pixels = np.array(Image.fromarray(skdata.astronaut()).resize((side, side), Image.BICUBIC))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def per_crop(image, boxes, sizes, flips):
    return [resized_crop(image, box, size, flip) for box, size, flip in zip(boxes, sizes, flips)]


FORMS = {"kernel": per_crop, "matmul": _resized_crops_by_matmul}


def draws(side: int, seed: int):
    """``BOXES_PER_ROUND`` images' worth of (boxes, sizes, flips), as the multi-crop transform draws them."""
    global_size, local_size, n_local = CASES[side]
    generator = torch.Generator().manual_seed(seed)
    sizes = [global_size] * 2 + [local_size] * n_local
    out = []
    for _ in range(BOXES_PER_ROUND):
        boxes = sample_crop_boxes(side, side, 2, (0.32, 1.0), generator=generator).tolist()
        boxes += sample_crop_boxes(side, side, n_local, (0.05, 0.32), generator=generator).tolist()
        flips = (torch.rand(len(sizes), generator=generator) < 0.5).tolist()
        out.append((boxes, sizes, flips))
    return out


def run_case(side: int, rounds: int, warmup: int) -> dict:
    image = photo(side)
    work = draws(side, seed=side)
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for r in range(warmup + rounds):
        for form in list(FORMS) if r % 2 == 0 else list(reversed(FORMS)):
            start = time.perf_counter()
            for boxes, sizes, flips in work:
                FORMS[form](image, boxes, sizes, flips)
            if r >= warmup:
                times[form].append((time.perf_counter() - start) / len(work))
    largest, differ, total = 0, 0, 0
    for boxes, sizes, flips in work:
        for a, b in zip(per_crop(image, boxes, sizes, flips), _resized_crops_by_matmul(image, boxes, sizes, flips)):
            gap = (a.int() - b.int()).abs()
            largest, differ, total = max(largest, int(gap.max())), differ + int(gap.ne(0).sum()), total + gap.numel()
    result = {form: statistics.median(ts) for form, ts in times.items()}
    result.update(largest=largest, share=differ / total, used=side * side <= SMALL_IMAGE_PIXELS)
    return result


def png_decoding(rounds: int) -> dict:
    grey = np.asarray(Image.fromarray(photo(28).permute(1, 2, 0).numpy()).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    data = buf.getvalue()

    def pil():
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)

    forms = {"PIL": pil, "torchvision": lambda: _png_to_chw(data)}
    assert torch.equal(forms["PIL"](), forms["torchvision"]())
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, fn in forms.items():
            start = time.perf_counter()
            for _ in range(200):
                fn()
            times[name].append((time.perf_counter() - start) / 200)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"one thread; {args.rounds} interleaved rounds of {BOXES_PER_ROUND} images, median; "
          f"matmuls used up to {SMALL_IMAGE_PIXELS} pixels")
    print(f"{'image':>6} {'crops':>16} {'kernel us':>10} {'matmul us':>10} {'kernel/matmul':>14} {'max diff':>9} "
          f"{'differ':>8}  used")
    for side in CASES:
        r = run_case(side, args.rounds, args.warmup)
        g, l, n = CASES[side]
        print(f"{side:>4}px {f'2x{g} + {n}x{l}':>16} {r['kernel'] * 1e6:10.1f} {r['matmul'] * 1e6:10.1f} "
              f"{r['kernel'] / r['matmul']:13.2f}x {r['largest']:9d} {100 * r['share']:7.2f}%  "
              f"{'matmul' if r['used'] else 'kernel'}")
    png = png_decoding(max(3, args.rounds // 4))
    print(f"grey 28 px PNG to (3,H,W) uint8: PIL {png['PIL'] * 1e6:.1f} us, torchvision {png['torchvision'] * 1e6:.1f}"
          f" us ({png['PIL'] / png['torchvision']:.2f}x)")


if __name__ == "__main__":
    main()
