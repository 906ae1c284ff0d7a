"""DINOv2 multi-crop augmentation, written for speed: two global crops and N local crops per image.

Geometry, per crop: RandomResizedCrop (scale range per crop type, log-uniform aspect ratio in (3/4, 4/3),
bicubic with antialiasing) and a horizontal flip with p 0.5; photometry, per crop: see
:mod:`dinoscale.data.transforms.photometric`.

Why it is fast: the image is decoded once (JPEG bytes at reduced size through PIL's draft mode when
every crop is downsampled by at least 2x anyway); each crop is cut out of the uint8 array and resized by
one antialiased uint8 kernel; the photometry runs per global crop and once for all local crops of an
image; and :func:`dinoscale.cpu_malloc.keep_freed_memory` stops glibc from returning the temporaries'
memory to the kernel after every call (measured: hue rotation of a 224 x 224 crop 1.6 ms instead of
0.26 ms). ``tools/bench_data.py`` measures it against the reference PIL pipeline.

All randomness comes from torch's random number generators, so a data loader that seeds torch per
sample makes every sample reproducible.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch

from dinoscale.cpu_malloc import keep_freed_memory
from dinoscale.data.transforms.decode import ImageInput, decode_for_boxes, open_image
from dinoscale.data.transforms.geometry import resized_crop, sample_crop_boxes
from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.data.transforms.photometric import photometric_batch


class MultiCropAugmentation:
    """DINOv2 multi-crop augmentation: 2 global crops and ``local_crops_number`` local crops.

    ``__call__(image)`` takes a PIL image, a uint8 tensor (C,H,W) (C = 1 is repeated to 3
    channels) or encoded JPEG/PNG bytes, and returns
    ``{"global_crops": [t1, t2], "local_crops": [t, ...]}`` of normalised float32 (3,S,S)
    tensors. With ``photometric_on_device=True`` the crops are uint8 after geometry only, and
    the trainer applies :func:`~dinoscale.data.transforms.photometric.photometric_collated` (or
    :func:`photometric_batch` per slot) to the collated batch on its device. ``ratio`` is the
    RandomResizedCrop aspect-ratio range; ``tune_allocator`` calls
    :func:`dinoscale.cpu_malloc.keep_freed_memory` on the first call in each process.
    """

    def __init__(
        self,
        global_crops_scale: Tuple[float, float] = (0.32, 1.0),
        local_crops_scale: Tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        photometric_on_device: bool = False,
        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        tune_allocator: bool = True,
    ):
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not (0.0 < scale[0] <= scale[1] <= 1.0):
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if global_crops_size <= 0 or local_crops_size <= 0:
            raise ValueError(
                f"crop sizes must be positive, got global_crops_size={global_crops_size}, "
                f"local_crops_size={local_crops_size}"
            )
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries with std > 0, got mean={mean}, std={std}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.photometric_on_device = bool(photometric_on_device)
        self.ratio = tuple(ratio)
        self.tune_allocator = bool(tune_allocator)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size}, "
            f"photometric_on_device={self.photometric_on_device})"
        )

    def sample_geometry(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boxes (2 + nL, 4) ``(top, left, h, w)`` in image coordinates, and flips (2 + nL,) bool."""
        global_boxes = sample_crop_boxes(height, width, 2, self.global_crops_scale, self.ratio)
        local_boxes = sample_crop_boxes(height, width, self.local_crops_number, self.local_crops_scale, self.ratio)
        flips = torch.rand(2 + self.local_crops_number) < 0.5
        return torch.cat([global_boxes, local_boxes]), flips

    def __call__(self, image: ImageInput, *, return_params: bool = False):
        """Crops of ``image``; with ``return_params=True`` also the drawn parameters.

        The parameters are ``boxes`` (2 + nL, 4) ``(top, left, h, w)`` in original image
        coordinates, ``flips`` (2 + nL,) bool, ``image_size`` ``(H, W)`` and, unless
        ``photometric_on_device``, the photometric parameters of each slot under ``global1``,
        ``global2`` and ``local`` (see :func:`sample_photometric_params`).
        """
        if self.tune_allocator:
            keep_freed_memory()  # in the process that runs the transform (e.g. each loader worker); once
        source, height, width = open_image(image)
        boxes, flips = self.sample_geometry(height, width)
        n_local = self.local_crops_number
        sizes = [self.global_crops_size] * 2 + [self.local_crops_size] * n_local
        own_pil = isinstance(image, (bytes, bytearray, memoryview))
        chw, pixel_boxes = decode_for_boxes(source, height, width, boxes, torch.tensor(sizes), allow_draft=own_pil)
        crops = [
            resized_crop(chw, box, size, flip) for box, size, flip in zip(pixel_boxes.tolist(), sizes, flips.tolist())
        ]
        params: Dict[str, Any] = {"boxes": boxes, "flips": flips, "image_size": (height, width)}
        if self.photometric_on_device:
            out = {
                "global_crops": [crops[0][0], crops[1][0]],
                "local_crops": [c[0] for c in crops[2:]],
            }
        else:
            kw = dict(mean=self.mean, std=self.std, return_params=True)
            # One call per global crop: a batch of one never needs subset indexing, and its
            # temporaries stay small enough for the caches.
            g1, params["global1"] = photometric_batch(crops[0], "global1", **kw)
            g2, params["global2"] = photometric_batch(crops[1], "global2", **kw)
            if n_local > 0:
                local, params["local"] = photometric_batch(torch.cat(crops[2:]), "local", **kw)
                local_list = list(local.unbind(0))
            else:
                local_list = []
            out = {"global_crops": [g1[0], g2[0]], "local_crops": local_list}
        if return_params:
            return out, params
        return out
