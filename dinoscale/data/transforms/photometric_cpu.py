"""DINOv2's per-sample photometry on the CPU through OpenCV: :func:`photometric_sample_cpu`.

The same distribution as :mod:`dinoscale.data.transforms.photometric` (the tensor implementation that also runs on
the accelerator): the same single parameter draw (:func:`photometric.draw_sample_params`), then per crop the
same operations in the same order. Only the arithmetic differs, by float32 rounding: the results agree with
:func:`photometric.photometric_batch`'s to about 1e-6 (``tests/data/transforms/test_photometric_cpu.py``).

Why OpenCV: on the CPU the tensor implementation is bound by its passes over memory, dozens per crop (the hue
rotation alone is 34 tensor operations; ``python benchmarks/photometry_memory.py``). OpenCV does each colour step in
one SIMD pass over interleaved pixels: the HSV round trip of the hue rotation, a 3x3 (or 3x4) colour matrix for
contrast, saturation, grayscale and the normalisation, a separable 9 x 9 Gaussian. So each crop is worked on as one
channels-last (H, W, 3) float32 image, and the geometry hands over channels-last crops
(``geometry.resized_crops(..., channels_last=True)``), which the uint8 resize makes faster too. Measured with
``python tools/bench_data.py`` on one core: the photometry of a sample (2 x 224 + 8 x 96 px) 3.10 ms against the
tensor implementation's 5.31 (``benchmarks/cpu_results/20261207T1446Z/``).

Where OpenCV's definitions could differ from the tensor implementation's, they are pinned:

* hue: OpenCV's float HSV has the hue in degrees, and its HSV -> RGB wraps hues of 360 and above but not negative
  ones, so the shift is added as ``(shift mod 1) * 360``;
* blur: ``GaussianBlur`` with ``sigma > 0`` and a 9-tap kernel computes ``exp(-t^2 / (2 sigma^2))`` normalised to
  sum 1 (torchvision's kernel), and ``BORDER_REFLECT_101`` is torch's ``"reflect"`` padding;
* contrast: the mean luma is the luma of the channel means (``cv2.mean``, accumulated in double).

Threads: OpenCV keeps its own thread pool. Shrinking a pool inherited through ``fork`` hangs the child
(``cv2.setNumThreads(1)`` in a child of a process that had used the pool: measured), so this module registers a
fork handler on import: the parent's pool is set to one thread around each ``os.fork`` (joined in the parent, where
its threads exist) and restored afterwards, so every forked child (a DataLoader worker) starts with one OpenCV
thread and no pool. :func:`use_opencv_threads` sets the count where that is safe. Limit: a process that was itself
forked from a parent that used OpenCV's pool without this module imported holds a stale pool; it is left alone.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Dict, List, Sequence

_CV2_IMPORTED_BEFORE = "cv2" in sys.modules

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dinoscale.data.transforms.photometric import (  # noqa: E402
    _LUMA,
    BLUR_KERNEL_SIZE,
    _solarize,
    check_crops,
    draw_sample_params,
    params_by_slot,
)

# The process may hold an OpenCV pool inherited through fork (stale: its threads did not survive) when OpenCV was
# imported before this module in a process that multiprocessing started; such a pool is never resized here.
_MAY_HOLD_STALE_POOL = _CV2_IMPORTED_BEFORE and multiprocessing.parent_process() is not None
_threads_before_fork: List[int] = []


def _pool_off_before_fork() -> None:
    count = cv2.getNumThreads()
    _threads_before_fork.append(count)
    if count > 1 and not _MAY_HOLD_STALE_POOL:
        cv2.setNumThreads(1)


def _pool_back_after_fork() -> None:
    count = _threads_before_fork.pop()
    if cv2.getNumThreads() != count:
        cv2.setNumThreads(count)


def _forked_child_is_clean() -> None:
    _threads_before_fork.clear()
    global _MAY_HOLD_STALE_POOL
    _MAY_HOLD_STALE_POOL = cv2.getNumThreads() > 1


os.register_at_fork(
    before=_pool_off_before_fork, after_in_parent=_pool_back_after_fork, after_in_child=_forked_child_is_clean
)


def use_opencv_threads(count: int) -> bool:
    """Let OpenCV use ``count`` threads in this process; False (and nothing changed) where its pool may be a stale
    copy inherited through ``fork``, whose resizing would hang. DataLoader workers call it with 1, as torch does."""
    if cv2.getNumThreads() == count:
        return True
    if _MAY_HOLD_STALE_POOL:
        return False
    cv2.setNumThreads(int(count))
    return True


_LUMA_ROWS = np.tile(np.asarray(_LUMA, np.float32), (3, 1))  # every output channel = the luma
_IDENTITY = np.eye(3, dtype=np.float32)
_BLUR_KERNEL = (BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE)
_BLUR_OPTIONS = {"borderType": cv2.BORDER_REFLECT_101}
if hasattr(cv2, "ALGO_HINT_ACCURATE"):  # OpenCV >= 4.10 may otherwise pick an approximate algorithm
    _BLUR_OPTIONS["hint"] = cv2.ALGO_HINT_ACCURATE


def _hwc_float(crop: torch.Tensor) -> np.ndarray:
    """A checked (1,3,H,W) uint8 or float CPU crop, any layout, as a new C-contiguous (H,W,3) float32 array in
    [0, 1] (a crop of channels-last layout is read in order)."""
    check_crops(crop)
    if crop.shape[0] != 1:
        raise ValueError(f"each crop must be one (1,3,H,W) image, got {tuple(crop.shape)}")
    if crop.device.type != "cpu":
        raise ValueError(f"photometric_sample_cpu works on CPU crops, got one on {crop.device}")
    hwc = crop.detach()[0].permute(1, 2, 0)
    if crop.dtype == torch.uint8:
        return np.multiply(hwc.numpy(), np.float32(1.0 / 255.0), dtype=np.float32, order="C")
    return np.array(hwc.to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def _adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    cv2.add(hsv, ((shift % 1.0) * 360.0, 0.0, 0.0, 0.0), dst=hsv)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _color_jitter(x: np.ndarray, p: Dict[str, np.ndarray], i: int) -> np.ndarray:
    """Crop ``i``'s jitter in its own order (torchvision's ColorJitter, as ``photometric._color_jitter_one``)."""
    for op in p["order"][i].tolist():
        if op == 3:
            x = _adjust_hue(x, float(p["hue"][i]))
            continue
        factor = float(p[("brightness", "contrast", "saturation")[op]][i])
        if op == 0:
            np.multiply(x, np.float32(factor), out=x)
        elif op == 1:
            r, g, b, _ = cv2.mean(x)
            grey = (1.0 - factor) * (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)
            x = cv2.transform(x, np.concatenate([factor * _IDENTITY, np.full((3, 1), grey, np.float32)], axis=1))
        else:  # a lerp toward the pixel's luma
            x = cv2.transform(x, factor * _IDENTITY + (1.0 - factor) * _LUMA_ROWS)
        if factor > 1.0:  # below 1 the step is a convex combination of values in [0, 1]
            np.clip(x, 0.0, 1.0, out=x)
    return x


def _photometry(crop: torch.Tensor, p: Dict[str, np.ndarray], i: int, normalise: np.ndarray) -> torch.Tensor:
    """Crop ``i`` of the draw ``p``: jitter, grayscale, blur, solarize, normalise; a planar (3,H,W) float32 tensor."""
    x = _hwc_float(crop)
    if p["jitter"][i]:
        x = _color_jitter(x, p, i)
    if p["grayscale"][i]:
        x = cv2.transform(x, _LUMA_ROWS)
    if p["blur"][i]:
        sigma = float(p["sigma"][i])
        x = cv2.GaussianBlur(x, _BLUR_KERNEL, sigma, dst=x, sigmaY=sigma, **_BLUR_OPTIONS)
    if p["solarize"][i]:
        _solarize(torch.from_numpy(x))  # the tensor implementation's exact step, in place
    x = cv2.transform(x, normalise)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def photometric_sample_cpu(
    global_crops: Sequence[torch.Tensor],
    local_crops: Sequence[torch.Tensor],
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    return_params: bool = False,
):
    """:func:`dinoscale.data.transforms.photometric.photometric_sample` through OpenCV: the same draw, signature and
    results up to float32 rounding, for CPU crops (each (1,3,S,S) uint8 or float, channels-last fastest).

    Returns ``([g1, g2], [l1, ...])`` of planar (3,S,S) float32 tensors; with ``return_params=True`` also the
    parameters per slot, ``{"global1": ..., "global2": ..., "local": ...}``.
    """
    p, slots = draw_sample_params(len(global_crops), len(local_crops))
    # (x - mean) / std per channel as one 3 x 4 colour matrix
    normalise = np.zeros((3, 4), np.float32)
    for c in range(3):
        normalise[c, c], normalise[c, 3] = 1.0 / std[c], -mean[c] / std[c]
    out = [_photometry(crop, p, i, normalise) for i, crop in enumerate([*global_crops, *local_crops])]
    if return_params:
        return out[:2], out[2:], params_by_slot(p, slots)
    return out[:2], out[2:]
