"""The evaluation transform: resize the shorter side, center-crop to a multiple of the patch size, normalise.

Also the image conversion it starts with (PIL, encoded bytes, numpy or tensor -> a ``(3, H, W)`` tensor), which
the visualisations share.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD


def round_to_patch(size: int, patch_size: int) -> int:
    """Nearest multiple of ``patch_size`` (at least one patch)."""
    if size < 1 or patch_size < 1:
        raise ValueError(f"image size and patch size must be positive, got {size}, {patch_size}")
    return max(patch_size, int(round(size / patch_size)) * patch_size)


def to_uint8_or_float_chw(image: Any) -> torch.Tensor:
    """Convert PIL / bytes / numpy / tensor input to a (3, H, W) tensor (uint8 or float in [0, 1]).

    Grayscale and RGBA inputs become RGB. Encoded bytes are decoded with PIL.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
            array = np.moveaxis(array, -1, 0)  # HWC -> CHW
        image = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"unsupported image type {type(image).__name__} (expected PIL, bytes, ndarray or tensor)")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"image tensor must be (H, W) or (C, H, W), got shape {tuple(image.shape)}")
    channels = image.shape[0]
    if channels == 1:
        image = image.expand(3, -1, -1)
    elif channels == 4:
        image = image[:3]
    elif channels != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {channels} (shape {tuple(image.shape)})")
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        raise ValueError(f"image tensor must be uint8 or floating point in [0, 1], got {image.dtype}")
    return image.contiguous()


class EvalTransform:
    """Resize the shorter side, center-crop to a multiple of the patch size, normalise.

    The resize keeps DINO's 256/224 ratio by default (``crop_ratio = 224/256``): the shorter
    side goes to ``crop_size / crop_ratio`` and the central ``crop_size`` square is kept.
    Use ``crop_ratio=1.0`` for small images whose borders matter (e.g. Fashion-MNIST).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        crop_ratio: float = 224 / 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.crop_size = round_to_patch(image_size, patch_size)
        self.resize_size = int(math.floor(self.crop_size / crop_ratio + 0.5))
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Any) -> torch.Tensor:
        x = to_uint8_or_float_chw(image)
        x = TF.to_dtype(x, torch.float32, scale=True)  # uint8 -> [0, 1]
        x = TF.resize(x, [self.resize_size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [self.crop_size, self.crop_size]).clamp_(0.0, 1.0)
        return TF.normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize_size}, crop={self.crop_size})"


def eval_transform(image_size: int, patch_size: int, crop_ratio: float = 224 / 256) -> EvalTransform:
    """The standard evaluation transform (see ``EvalTransform``)."""
    return EvalTransform(image_size, patch_size, crop_ratio=crop_ratio)
