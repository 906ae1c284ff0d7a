"""DINOv2 multi-crop augmentation, written for speed: two global crops and N local crops per image.

Geometry, per crop: RandomResizedCrop (scale range per crop type, log-uniform aspect ratio in (3/4, 4/3),
bicubic with antialiasing) and a horizontal flip with p 0.5; photometry, per crop: see
:mod:`dinoscale.data.transforms.photometric`.

Why it is fast: the image is decoded once (JPEG bytes at reduced size through PIL's draft mode when
every crop is downsampled by at least 2x anyway, else by torchvision's decoder, as are 8-bit grey and RGB PNGs;
the size comes from the JPEG or PNG header without PIL); the boxes and flips come from one RNG call; each crop is
cut out of the uint8 array and resized by one antialiased uint8 kernel (on a small image, all crops by two batched
matmuls: ``geometry.resized_crops``), into channels-last memory; the photometry draws once per image and runs
per crop through OpenCV on channels-last float32 pixels (``photometric_cpu.photometric_sample_cpu``: one SIMD pass
per colour step, where the tensor implementation makes dozens); and :func:`dinoscale.cpu_malloc.keep_freed_memory`
stops glibc from returning the temporaries' memory to the kernel after every call (measured: hue rotation of a
224 x 224 crop 1.6 ms instead of 0.26 ms).
``tools/bench_data.py`` measures it against facebookresearch/dinov2's own pipeline.

All randomness comes from torch's random number generators, so a data loader that seeds torch per
sample makes every sample reproducible.

Two DINOv3 options (both off by default, and then the output is exactly the one above):

* ``gram_crops_size``: each global crop also comes at that size for the Gram teacher (``"gram_crops"``). The
  crop box is cut once at ``max(global, gram)`` size, the photometry runs there, and the result is resized
  (bicubic, antialiased) to each size, so both are the same view with the same photometric result, the Gram
  crop with more pixels (DINOv3's ``crops.gram_teacher_crops_size``, its order when the Gram crop shares the
  distortions). The photometry of the global crops then costs as much as at the larger size.
* ``resolutions`` (:class:`CropResolutions`): the crop sizes are drawn per training step (DINOv3's
  high-resolution adaptation). The step sources call :meth:`MultiCropAugmentation.at_step` and transform the
  step's samples with the returned transform, so all images of a step share their sizes.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dinoscale.cpu_malloc import keep_freed_memory
from dinoscale.data.seeding import derive_seed
from dinoscale.data.transforms.decode import ImageInput, decode_for_boxes, open_image
from dinoscale.data.transforms.geometry import BOX_PROPOSALS, crop_boxes_from_uniforms, resized_crops
from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.data.transforms.photometric import photometric_sample
from dinoscale.data.transforms.photometric_cpu import photometric_sample_cpu

#: How the per-sample photometry runs on the CPU: "opencv" (:mod:`~dinoscale.data.transforms.photometric_cpu`, the
#: default, 1.7x as fast in ``python tools/bench_data.py``) or "torch"
#: (:func:`~dinoscale.data.transforms.photometric.photometric_sample`, the tensor operations of the accelerator path,
#: bit for bit; also what runs on the crops of an image given as an accelerator tensor).
PHOTOMETRY_BACKENDS = ("opencv", "torch")


@dataclass(frozen=True)
class CropResolutions:
    """Crop sizes drawn per step: entry ``i`` is ``(global_sizes[i], local_sizes[i], gram_sizes[i])``, drawn with
    probability ``weights[i] / sum(weights)`` (a gram size of None: no Gram crops at that step).

    The draw of a step is a function of ``(seed, step)`` alone (:meth:`at_step`), so every rank and every resume
    draws the same sizes for the same step. (DINOv3 pairs the sizes the same way, ``crops.global_crops_size``,
    ``local_crops_size``, ``gram_teacher_crops_size`` and ``global_local_crop_pairs_ratios`` as lists.)
    """

    global_sizes: Tuple[int, ...]
    local_sizes: Tuple[int, ...]
    gram_sizes: Tuple[Optional[int], ...]
    weights: Tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.global_sizes)
        if n == 0 or not len(self.local_sizes) == len(self.gram_sizes) == len(self.weights) == n:
            raise ValueError(
                f"the multi-resolution crop sizes need one global size, local size, gram size and weight per entry, "
                f"got {len(self.global_sizes)}, {len(self.local_sizes)}, {len(self.gram_sizes)} and "
                f"{len(self.weights)}"
            )
        sizes = [*self.global_sizes, *self.local_sizes, *(g for g in self.gram_sizes if g is not None)]
        if any(int(x) <= 0 for x in sizes):
            raise ValueError(f"crop sizes must be positive, got {self}")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"the weights must be >= 0 with a positive sum, got {list(self.weights)}")

    def at_step(self, step: int, seed: int) -> Tuple[int, int, Optional[int]]:
        """``(global size, local size, gram size or None)`` of global ``step`` of a run seeded ``seed``."""
        rng = random.Random(derive_seed(seed, "crop-resolution", step))
        i = rng.choices(range(len(self.weights)), weights=self.weights)[0]
        return self.global_sizes[i], self.local_sizes[i], self.gram_sizes[i]


def _geometry_tensors(boxes: List[Tuple[int, int, int, int]], flips: List[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N,4) long and flips (N,) bool tensors from their lists."""
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4), torch.tensor(flips, dtype=torch.bool)


def _resize(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Finished (B,3,S,S) crops -> (B,3,size,size), bicubic with antialiasing (nothing to do at S == size)."""
    if crops.shape[-1] == size:
        return crops
    return F.interpolate(crops, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


class MultiCropAugmentation:
    """DINOv2 multi-crop augmentation: 2 global crops and ``local_crops_number`` local crops.

    ``__call__(image)`` takes a PIL image, a uint8 tensor (C,H,W) (C = 1 is repeated to 3
    channels) or encoded JPEG/PNG bytes, and returns
    ``{"global_crops": [t1, t2], "local_crops": [t, ...]}`` of normalised float32 (3,S,S)
    tensors. With ``photometric_on_device=True`` the crops are uint8 after geometry only, and
    the trainer applies :func:`~dinoscale.data.transforms.photometric.photometric_collated` (or
    :func:`photometric_batch` per slot) to the collated batch on its device. ``ratio`` is the
    RandomResizedCrop aspect-ratio range; ``tune_allocator`` calls
    :func:`dinoscale.cpu_malloc.keep_freed_memory` on the first call in each process. ``photometry_backend`` picks
    the per-sample photometry's implementation (:data:`PHOTOMETRY_BACKENDS`; both draw the same parameters and agree
    to float32 rounding).

    ``gram_crops_size`` adds ``"gram_crops": [g1, g2]``, the global crops at that size (see the module
    docstring; needs the photometry here, not on the device). With ``resolutions``, :meth:`at_step` gives the
    transform of a step; called directly, the transform uses the sizes given here.
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
        gram_crops_size: Optional[int] = None,
        resolutions: Optional[CropResolutions] = None,
        photometry_backend: str = "opencv",
    ):
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not (0.0 < scale[0] <= scale[1] <= 1.0):
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if len(ratio) != 2 or not (0.0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {tuple(ratio)}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if global_crops_size <= 0 or local_crops_size <= 0:
            raise ValueError(
                f"crop sizes must be positive, got global_crops_size={global_crops_size}, "
                f"local_crops_size={local_crops_size}"
            )
        if gram_crops_size is not None and gram_crops_size <= 0:
            raise ValueError(f"gram_crops_size must be positive or None, got {gram_crops_size}")
        gram_anywhere = gram_crops_size is not None or (
            resolutions is not None and any(g is not None for g in resolutions.gram_sizes)
        )
        if gram_anywhere and photometric_on_device:
            raise ValueError(
                "Gram crops share the global crops' photometry, which runs once at the larger size in the data "
                "loader: set photometric_on_device=False (crops.photometric_on_device)"
            )
        if photometry_backend not in PHOTOMETRY_BACKENDS:
            raise ValueError(f"photometry_backend must be one of {PHOTOMETRY_BACKENDS}, got {photometry_backend!r}")
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
        self.gram_crops_size = None if gram_crops_size is None else int(gram_crops_size)
        self.resolutions = resolutions
        self.photometry_backend = photometry_backend

    def at_step(self, step: int, seed: int) -> "MultiCropAugmentation":
        """The transform of global ``step`` of a run seeded ``seed``: with ``resolutions``, a copy with the step's
        crop sizes (:meth:`CropResolutions.at_step`); else this transform."""
        if self.resolutions is None:
            return self
        out = copy.copy(self)
        out.global_crops_size, out.local_crops_size, out.gram_crops_size = self.resolutions.at_step(step, seed)
        out.resolutions = None
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size}, "
            f"photometric_on_device={self.photometric_on_device}, gram_crops_size={self.gram_crops_size}, "
            f"resolutions={self.resolutions}, photometry_backend={self.photometry_backend!r})"
        )

    def sample_geometry(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boxes (2 + nL, 4) ``(top, left, h, w)`` in image coordinates, and flips (2 + nL,) bool."""
        return _geometry_tensors(*self._draw_geometry(height, width))

    def _draw_geometry(self, height: int, width: int) -> Tuple[List[Tuple[int, int, int, int]], List[bool]]:
        """:meth:`sample_geometry` as Python lists, from one RNG call: per crop, the uniforms of
        :func:`crop_boxes_from_uniforms` (10 proposals and the position), then the flip's."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got height={height}, width={width}")
        draws = torch.rand(2 + self.local_crops_number, 2 * BOX_PROPOSALS + 3, dtype=torch.float64).tolist()
        global_boxes = crop_boxes_from_uniforms(height, width, [d[:-1] for d in draws[:2]], self.global_crops_scale,
                                                self.ratio)
        local_boxes = crop_boxes_from_uniforms(height, width, [d[:-1] for d in draws[2:]], self.local_crops_scale,
                                               self.ratio)
        return global_boxes + local_boxes, [d[-1] < 0.5 for d in draws]

    def __call__(self, image: ImageInput, *, return_params: bool = False):
        """Crops of ``image``; with ``return_params=True`` also the drawn parameters.

        The parameters are ``boxes`` (2 + nL, 4) ``(top, left, h, w)`` in original image
        coordinates, ``flips`` (2 + nL,) bool, ``image_size`` ``(H, W)`` and, unless
        ``photometric_on_device``, the photometric parameters of each slot under ``global1``,
        ``global2`` and ``local`` (see :func:`sample_photometric_params`).
        """
        if self.tune_allocator:
            keep_freed_memory()  # in the process that runs the transform (e.g. each loader worker); once
        # Inference mode: no autograd bookkeeping on the ~300 small tensor ops of an image (measured 7% of the
        # transform's time). The crops are inference tensors: collating (torch.stack) gives ordinary tensors.
        with torch.inference_mode():
            return self._crops(image, return_params)

    def _crops(self, image: ImageInput, return_params: bool):
        source, height, width = open_image(image)
        boxes, flips = self._draw_geometry(height, width)
        n_local = self.local_crops_number
        gram_size = self.gram_crops_size
        # with Gram crops, each global box is cut once, at the larger of the two sizes
        cut = self.global_crops_size if gram_size is None else max(self.global_crops_size, gram_size)
        sizes = [cut] * 2 + [self.local_crops_size] * n_local
        own_pil = isinstance(image, (bytes, bytearray, memoryview))
        chw, pixel_boxes = decode_for_boxes(
            source, height, width, boxes, sizes, allow_draft=own_pil, data=image if own_pil else None
        )
        opencv = self.photometry_backend == "opencv" and not self.photometric_on_device and chw.device.type == "cpu"
        crops = resized_crops(chw, pixel_boxes, sizes, flips, channels_last=opencv)
        params: Dict[str, Any] = {}
        if return_params:
            params["boxes"], params["flips"] = _geometry_tensors(boxes, flips)
            params["image_size"] = (height, width)
        if self.photometric_on_device:
            out = {
                "global_crops": [crops[0][0], crops[1][0]],
                "local_crops": [c[0] for c in crops[2:]],
            }
        else:
            photometry = (photometric_sample_cpu if opencv else photometric_sample)(
                crops[:2], crops[2:], mean=self.mean, std=self.std, return_params=return_params
            )
            if return_params:  # the parameters as tensors only when asked for
                params.update(photometry[2])
            out = {"global_crops": photometry[0], "local_crops": photometry[1]}
            if gram_size is not None:
                both = torch.stack(out["global_crops"])
                out["global_crops"] = list(_resize(both, self.global_crops_size).unbind(0))
                out["gram_crops"] = list(_resize(both, gram_size).unbind(0))
        if return_params:
            return out, params
        return out
