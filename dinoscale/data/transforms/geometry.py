"""Crop geometry: RandomResizedCrop boxes, and cutting, resizing and flipping one crop out of uint8 pixels."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

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


def resized_crop(chw: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """Crop ``box`` out of a uint8 (3,H,W) image, resize to ``size`` (bicubic, antialiased), flip."""
    top, left, box_h, box_w = box
    patch = chw[:, top : top + box_h, left : left + box_w].unsqueeze(0)
    if (box_h, box_w) != (size, size):
        # torch has a vectorised uint8 kernel for antialiased bicubic resizing on CPU; elsewhere
        # (e.g. a CUDA tensor input) go through float32. (A channels-last copy of the box first makes the
        # kernel 15% faster, but its channels-last output then costs as much to make planar: measured no gain.)
        if patch.device.type == "cpu":
            patch = F.interpolate(patch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        else:
            patch = F.interpolate(
                patch.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
            patch = patch.clamp_(0, 255).round_().to(torch.uint8)
    if flip:
        patch = patch.flip(3)
    return patch.contiguous()
