"""SimMIM's and BEiT's views: one RandomResizedCrop (bicubic, antialiased) with a horizontal flip, normalised; no
colour. BEiT's (:class:`RandomResizedCropFlipPair`) resizes the same crop to two sizes: the ViT's and its
tokenizer's."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dinoscale.data.transforms.decode import as_uint8_chw
from dinoscale.data.transforms.geometry import sample_crop_boxes
from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD


class RandomResizedCropFlip:
    """One view: RandomResizedCrop (bicubic, antialiased) to ``size``, horizontal flip with p 0.5, normalisation.

    Returns a float32 ``(3, size, size)`` tensor. Randomness comes from torch's global RNG (the data loader
    seeds it per sample).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.67, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if size <= 0:
            raise ValueError(f"crop size must be positive, got {size}")
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"

    def crop_and_flip(self, image: Any) -> tuple[torch.Tensor, bool]:
        """``(crop (1, 3, h, w) float in [0, 255], flip)``: a random box of ``image`` and whether to flip it (the
        two draws from torch's global RNG, box first)."""
        chw = as_uint8_chw(image)
        top, left, h, w = sample_crop_boxes(chw.shape[1], chw.shape[2], 1, self.scale, self.ratio)[0].tolist()
        crop = chw[:, top : top + h, left : left + w].unsqueeze(0).float()
        return crop, bool(torch.rand(()) < 0.5)

    def finish(self, crop: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
        """``crop`` resized to ``size`` (bicubic, antialiased), flipped if ``flip``, normalised: (3, size, size)."""
        if tuple(crop.shape[-2:]) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True,
                                 align_corners=False).clamp_(0.0, 255.0)
        if flip:
            crop = crop.flip(3)
        return (crop[0] / 255.0 - self.mean) / self.std

    def __call__(self, image: Any) -> torch.Tensor:
        crop, flip = self.crop_and_flip(image)
        return self.finish(crop, self.size, flip)


class RandomResizedCropFlipPair(RandomResizedCropFlip):
    """BEiT's two views of one crop: the same box and flip resized to ``size`` (the ViT's input) and to
    ``second_size`` (its tokenizer's input; BEiT: 224 and 112 px). Returns ``(view, second_view)``, both
    normalised like :class:`RandomResizedCropFlip`'s (which draws the same box and flip from the same RNG state)."""

    def __init__(self, size: int, second_size: int, **kwargs: Any):
        super().__init__(size, **kwargs)
        if second_size <= 0:
            raise ValueError(f"the second crop size must be positive, got {second_size}")
        self.second_size = int(second_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, second_size={self.second_size}, scale={self.scale}, "
                f"ratio={self.ratio})")

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        crop, flip = self.crop_and_flip(image)
        return self.finish(crop, self.size, flip), self.finish(crop, self.second_size, flip)
