"""Crop geometry: RandomResizedCrop boxes, and cutting, resizing and flipping crops out of uint8 pixels."""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# RandomResizedCrop's proposals per box before it falls back to a centred crop (torchvision's 10).
BOX_PROPOSALS = 10


def sample_crop_boxes(
    height: int,
    width: int,
    num_crops: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
    num_attempts: int = BOX_PROPOSALS,
) -> torch.Tensor:
    """Sample ``num_crops`` RandomResizedCrop boxes for an image of size ``height x width``.

    Each box covers a fraction ``U(scale)`` of the image area with a log-uniform aspect ratio
    (width / height) in ``ratio``. As in torchvision, a proposal that does not fit inside the image
    is redrawn up to ``num_attempts`` times, after which the box falls back to the largest centred
    crop whose aspect ratio lies within ``ratio``. All attempts are drawn at once (same
    distribution as drawing them one after another, far fewer RNG calls).

    Returns a long tensor ``(num_crops, 4)`` of ``(top, left, box_height, box_width)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if not (0.0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
    if not (0.0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    if num_crops == 0:
        return torch.zeros(0, 4, dtype=torch.long)

    # One RNG call for everything; the per-crop logic is a few scalar operations, far cheaper in
    # plain Python than as tensor ops.
    draws = torch.rand(num_crops, 2 * num_attempts + 2, generator=generator, dtype=torch.float64).tolist()
    return torch.tensor(crop_boxes_from_uniforms(height, width, draws, scale, ratio), dtype=torch.long)


def crop_boxes_from_uniforms(
    height: int,
    width: int,
    uniforms: Sequence[Sequence[float]],
    scale: Tuple[float, float],
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> List[Tuple[int, int, int, int]]:
    """The RandomResizedCrop boxes of :func:`sample_crop_boxes`, one per row of U(0, 1) draws.

    A row holds ``2 * A + 2`` uniforms: ``A`` (area, aspect ratio) proposals, then the position of the box.
    Returns ``(top, left, box_height, box_width)`` tuples.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    boxes = []
    for row in uniforms:
        for k in range(0, len(row) - 2, 2):
            target_area = area * (scale[0] + (scale[1] - scale[0]) * row[k])
            aspect = math.exp(log_lo + (log_hi - log_lo) * row[k + 1])
            box_w = int(round(math.sqrt(target_area * aspect)))
            box_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < box_w <= width and 0 < box_h <= height:
                u_top, u_left = row[-2], row[-1]
                top = min(int(u_top * (height - box_h + 1)), height - box_h)
                left = min(int(u_left * (width - box_w + 1)), width - box_w)
                boxes.append((top, left, box_h, box_w))
                break
        else:
            # No proposal fitted: the largest centred crop with its aspect ratio inside ``ratio``.
            in_ratio = width / height
            if in_ratio < ratio[0]:
                box_w, box_h = width, int(round(width / ratio[0]))
            elif in_ratio > ratio[1]:
                box_w, box_h = int(round(height * ratio[1])), height
            else:
                box_w, box_h = width, height
            boxes.append(((height - box_h) // 2, (width - box_w) // 2, box_h, box_w))
    return boxes


def resized_crop(
    chw: torch.Tensor, box: Sequence[int], size: int, flip: bool, channels_last: bool = False
) -> torch.Tensor:
    """Crop ``box`` out of a uint8 (3,H,W) image, resize to ``size`` (bicubic, antialiased), flip; a contiguous
    (1,3,S,S) crop, in channels-last memory with ``channels_last``."""
    top, left, box_h, box_w = box
    patch = chw[:, top : top + box_h, left : left + box_w].unsqueeze(0)
    if (box_h, box_w) != (size, size):
        # torch has a vectorised uint8 kernel for antialiased bicubic resizing on CPU; elsewhere
        # (e.g. a CUDA tensor input) go through float32. The kernel is fastest on channels-last pixels (which the
        # decoders give), and so is the OpenCV photometry (photometric_cpu); a planar crop costs one more copy.
        if patch.device.type == "cpu":
            patch = F.interpolate(patch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        else:
            patch = F.interpolate(
                patch.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
            patch = patch.clamp_(0, 255).round_().to(torch.uint8)
    if flip:
        patch = patch.flip(3)
    return patch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


#: Images of at most this many pixels have their crops resized by batched matmuls (:func:`resized_crops`).
SMALL_IMAGE_PIXELS = 48 * 48


def resized_crops(
    chw: torch.Tensor,
    boxes: Sequence[Sequence[int]],
    sizes: Sequence[int],
    flips: Sequence[bool],
    channels_last: bool = False,
) -> List[torch.Tensor]:
    """Each box of a uint8 (3,H,W) image resized to its size (bicubic, antialiased) and flipped: a list of uint8
    (1,3,S,S) crops, as :func:`resized_crop` per box (``channels_last``: see there; a small image's crops come in
    the layout of the matmuls below).

    A CPU image of at most :data:`SMALL_IMAGE_PIXELS` pixels (Fashion-MNIST, CIFAR) has all its crops made by
    :func:`_resized_crops_by_matmul` instead, two matmuls for all of them: on such images one call of the resize
    kernel costs more than its pixels (``python benchmarks/small_image_crops.py``).
    """
    if chw.device.type != "cpu" or chw.shape[1] * chw.shape[2] > SMALL_IMAGE_PIXELS or not sizes:
        return [resized_crop(chw, box, size, flip, channels_last) for box, size, flip in zip(boxes, sizes, flips)]
    return _resized_crops_by_matmul(chw, boxes, sizes, flips)


@functools.lru_cache(maxsize=4096)
def _resize_weights(in_len: int, out_len: int) -> np.ndarray:
    """The (out_len, in_len) float32 matrix of torch's antialiased bicubic resize from ``in_len`` to ``out_len``
    pixels, read off the kernel itself: it resizes the rows of an identity matrix (in float64)."""
    eye = torch.eye(in_len, dtype=torch.float64).view(1, in_len, 1, in_len)
    rows = F.interpolate(eye, size=(1, out_len), mode="bicubic", antialias=True, align_corners=False)
    return rows[0, :, 0, :].T.to(torch.float32).numpy().copy()


def _resized_crops_by_matmul(
    chw: torch.Tensor, boxes: Sequence[Sequence[int]], sizes: Sequence[int], flips: Sequence[bool]
) -> List[torch.Tensor]:
    """:func:`resized_crops` as one matmul and one batched matmul for all crops.

    Crop ``i`` is ``Y_i @ image @ X_i^T`` per channel, ``X_i`` (S,W) and ``Y_i`` (S,H) the resize matrices of its
    box placed at its columns and rows (zero elsewhere; ``X_i``'s rows reversed for a flip). As in the uint8 kernel
    the horizontal pass comes first and each pass rounds to whole values clamped to [0, 255]; its weights are
    fixed-point, so a pixel may differ from it by 1 or 2 (in under 1% of the pixels). Every crop is computed at the
    largest size, a smaller one's extra rows and columns zero, and everything is computed transposed, which makes
    every reshape free: the crops are uint8 (1,3,S,S) views of one buffer, not contiguous.
    """
    _, height, width = chw.shape
    n, top_size = len(sizes), max(sizes)
    across = np.zeros((n, top_size, width), np.float32)  # the X_i
    down = np.zeros((n, height, top_size), np.float32)  # the Y_i^T
    for i, ((top, left, box_h, box_w), size, flip) in enumerate(zip(boxes, sizes, flips)):
        weights = _resize_weights(box_w, size)
        across[i, :size, left : left + box_w] = weights[::-1] if flip else weights
        down[i, top : top + box_h, :size] = _resize_weights(box_h, size).T
    # the image as (W, 3H): its transpose per channel, side by side
    image_t = chw.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).view(width, 3 * height)
    # horizontal: (n S, W) @ (W, 3H) = per crop, column x of the resized rows, per channel
    rows_t = torch.from_numpy(across).view(n * top_size, width) @ image_t
    rows_t = rows_t.round_().clamp_(0, 255).view(n, top_size * 3, height)
    # vertical: (n, S 3, H) @ (n, H, S) = crop i's pixel (y, x) of channel c at [i, x, c, y]
    crops_t = (rows_t @ torch.from_numpy(down)).round_().clamp_(0, 255)
    crops_t = crops_t.to(torch.int32).to(torch.uint8)  # via int32: float32 -> uint8 directly is 2x slower here
    # crop i as (1, 3, y, x) with one call each (indexing with slices costs one call per sliced dim)
    per_crop, row_stride = 3 * top_size * top_size, 3 * top_size
    return [
        crops_t.as_strided((1, 3, size, size), (per_crop, top_size, 1, row_stride), i * per_crop)
        for i, size in enumerate(sizes)
    ]
