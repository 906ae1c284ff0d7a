"""DINOv2's photometric augmentation, batched: one function for per-sample CPU use and per-batch device use.

Per crop: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order) with
p 0.8, grayscale with p 0.2, Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0)) with p 1.0 on global crop 1,
0.1 on global crop 2 and 0.5 on each local crop, solarize (threshold 128) with p 0.2 on global crop 2
only, then mean/std normalisation.

The reference implementation passes ``1 - p`` to ``RandomApply`` for the blur, so its first global
crop is never blurred and its second one is blurred 90% of the time; here the documented
probabilities are used (see ``BLUR_PROBABILITY``).

Why it is fast: the colour operations are float32 tensor ops written for few passes and few calls (a
3-step hue rotation without an HSV round trip, jitter steps as one lerp each over only the images they change,
separable blur as shifted multiply-adds, solarize without a boolean mask, per-image decisions in numpy,
constants as cached 0-dim tensors). The same code runs per batch on the accelerator (``photometric_on_device=True``:
:func:`photometric_batch` via :func:`photometric_collated`) and per sample (:func:`photometric_sample`, which
:class:`dinoscale.data.transforms.multicrop.MultiCropAugmentation` calls with ``photometry_backend="torch"``), so
those two share their distribution by construction. The default per-sample path on the CPU is
:mod:`dinoscale.data.transforms.photometric_cpu`: the same draws and operations through OpenCV, equal to these to
float32 rounding (tested).

All randomness comes from torch's random number generators (the global one unless a ``generator`` is
passed).
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD

#: Crop slots understood by :func:`photometric_batch`.
CROP_KINDS = ("global1", "global2", "local")
#: Probability of the Gaussian blur per crop slot (the documented DINOv2 values).
BLUR_PROBABILITY = {"global1": 1.0, "global2": 0.1, "local": 0.5}
#: Probability of solarisation per crop slot.
SOLARIZE_PROBABILITY = {"global1": 0.0, "global2": 0.2, "local": 0.0}

JITTER_PROBABILITY = 0.8
BRIGHTNESS = 0.4
CONTRAST = 0.4
SATURATION = 0.2
HUE = 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128

# ITU-R 601 luma weights, as used by PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


# On small crops these functions are dominated by per-op overhead (~1-2 us per torch call), so
# they are written to issue few calls: parameters and per-image decisions live in numpy on the
# CPU, constants are cached per device, and a batch of one uses Python floats instead of
# coefficient tensors.

_DEVICE_CONSTANTS: Dict[Tuple[Hashable, torch.device], torch.Tensor] = {}


def _constant(name: Hashable, values: Sequence[float], shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    tensor = _DEVICE_CONSTANTS.get(key)
    if tensor is None:
        tensor = torch.tensor(values, dtype=torch.float32, device=device).view(shape)
        _DEVICE_CONSTANTS[key] = tensor
    return tensor


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a cached 0-dim float32 tensor on ``device`` (keyed by the number itself). Arithmetic with a
    Python number converts it to a tensor on every call (scratch timing: 2.4 us for ``x.mul_(2.0)`` on a small
    tensor against 0.9 us with this)."""
    return _constant(value, (value,), (), device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma. Elementwise on purpose: a matmul would run in reduced
    precision under an autocast region or with TF32 enabled."""
    r, g, b = x.unbind(1)
    return torch.mul(r, _scalar(_LUMA[0], x.device)).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _per_image(values: np.ndarray, device: torch.device, ndim: int = 4):
    """A Python float for a batch of one, else a (B,1,...,1) float32 tensor on ``device``."""
    if values.shape[0] == 1:
        return float(values[0])
    return torch.from_numpy(values.astype(np.float32)).to(device, non_blocking=True).view((-1,) + (1,) * (ndim - 1))


def _adjust_hue(x: torch.Tensor, shift, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` (B,3,H,W) in [0,1] by ``shift`` turns (float or (B,1,1) tensor); the result in
    ``out`` when given (``x`` itself may be ``out``), else in a new tensor.

    Value (max) and chroma (max - min) are unchanged, so no full HSV round trip is needed. With
    the hue ``h`` in sextants, wrapped to [0, 6), the channels are ``min + chroma * w`` with
    ``w_R = clamp(|h - 3| - 1, 0, 1)``, ``w_G = clamp(2 - |h - 2|, 0, 1)``,
    ``w_B = clamp(2 - |h - 4|, 0, 1)``. Before the shift, ``h`` is ``(g - b) / chroma`` when R is
    the maximum, ``(b - r) / chroma + 2`` for G and ``(r - g) / chroma + 4`` for B; the branches
    are 0/1 float masks from ``sign()`` (``torch.where`` is ~20x slower on CPU).
    """
    r, g, b = x.unbind(1)
    device = x.device
    max_gb = torch.maximum(g, b)
    maxc = torch.maximum(r, max_gb)
    minc = torch.minimum(torch.minimum(g, b), r)
    chroma = maxc - minc
    not_r = (maxc - r).sign_()  # 0 where R is the maximum (ties go to R), else 1
    # G is the maximum (ties between G and B go to G)
    is_g = (g - max_gb).sign_().add_(_scalar(1.0, device)).mul_(not_r)
    # With is_r = 1 - not_r and is_b = not_r - is_g, the numerator
    # is_r (g - b) + is_g (b - r) + is_b (r - g) = (g - b) + not_r (r + b - 2g) + is_g (b + g - 2r)
    # and the sextant offset 2 is_g + 4 is_b = 4 not_r - 2 is_g.
    hue = g - b
    hue.addcmul_(not_r, (r + b).sub_(g, alpha=2.0))
    hue.addcmul_(is_g, (b + g).sub_(r, alpha=2.0))
    hue.div_(chroma.clamp(min=1e-12))  # grey pixels: 0 / eps = 0 (their hue is irrelevant)
    hue.add_(not_r, alpha=4.0).add_(is_g, alpha=-2.0)
    if isinstance(shift, torch.Tensor):
        hue.add_(shift, alpha=6.0)
    else:
        hue.add_(_scalar(6.0, device), alpha=shift)
    hue.sub_(torch.floor(hue * _scalar(1.0 / 6.0, device)).mul_(_scalar(6.0, device)))
    weights = (hue.unsqueeze(1) - _constant("hue_centre", (3.0, 2.0, 4.0), (1, 3, 1, 1), device)).abs_()
    weights.mul_(_constant("hue_sign", (1.0, -1.0, -1.0), (1, 3, 1, 1), device))
    weights.add_(_constant("hue_offset", (-1.0, 2.0, 2.0), (1, 3, 1, 1), device)).clamp_(0.0, 1.0)
    weights.mul_(chroma.unsqueeze(1))
    if out is None:
        return weights.add_(minc.unsqueeze(1))
    return torch.add(weights, minc.unsqueeze(1), out=out)


# A blur tap this small is left out (see _gaussian_blur).
_NEGLIGIBLE_TAP = 2.0**-30


def _gaussian_blur(x: torch.Tensor, sigma: np.ndarray, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) with a per-image ``sigma`` (numpy (B,)), reflect padding.

    The kernel is ``exp(-t^2 / (2 sigma^2))`` for ``t = -k//2 .. k//2``, normalised to sum 1 (as
    torchvision). Written as shifted multiply-adds over ``unfold`` views: a depthwise conv2d
    with 9-tap kernels is ~10x slower on CPU. Outer taps below ``2^-30`` in every image (small sigmas) are
    left out: together they weigh less than float32 resolves next to 1, and the sigma below 0.15 leaves only the
    centre tap, the identity.
    """
    bsz, _, height, width = x.shape
    half = kernel_size // 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1)[None, :] / np.asarray(sigma, np.float64)[:, None]) ** 2)
    taps /= taps.sum(axis=1, keepdims=True)  # (B, K)
    reach = int(np.flatnonzero((taps >= _NEGLIGIBLE_TAP).any(axis=0))[-1]) - half
    if reach == 0:
        return x
    if reach < half:
        taps, half, kernel_size = taps[:, half - reach : half + reach + 1], reach, 2 * reach + 1
    if bsz == 1:
        weights = [float(t) for t in taps[0]]
    else:
        weights = torch.from_numpy(taps.T.astype(np.float32)).to(x.device, non_blocking=True)
        weights = weights.view(kernel_size, bsz, 1, 1, 1).unbind(0)
    padded = F.pad(x, (half, half, half, half), mode="reflect")
    # unfold(dim, n, 1).unbind gives the K shifted views of length n along dim in two calls.
    shifted = padded.unfold(3, width, 1).unbind(3)  # K x (B,C,H+2h,W)
    rows = _weighted_sum(shifted, weights)
    shifted = rows.unfold(2, height, 1).movedim(-1, 3).unbind(2)  # K x (B,C,H,W)
    return _weighted_sum(shifted, weights)


def _weighted_sum(views, weights) -> torch.Tensor:
    out = views[0] * weights[0]
    if isinstance(weights[0], float):
        for view, w in zip(views[1:], weights[1:]):
            out.add_(view, alpha=w)
    else:
        for view, w in zip(views[1:], weights[1:]):
            out.addcmul_(view, w)
    return out


def _on_subset(x: torch.Tensor, mask: np.ndarray, fn) -> torch.Tensor:
    """Apply ``fn(x_subset, indices)`` to the images selected by the numpy bool ``mask``.

    The selection is decided on the CPU, so a GPU batch needs no synchronisation for it.
    ``indices`` is a numpy index array (all images: ``slice(None)``).
    """
    count = int(np.count_nonzero(mask))
    if count == 0:
        return x
    if count == mask.shape[0]:
        return fn(x, slice(None))
    idx = np.flatnonzero(mask)
    idx_device = torch.from_numpy(idx).to(x.device, non_blocking=True)
    result = fn(x.index_select(0, idx_device), idx)
    if x.device.type != "cpu" or count > 16:
        return x.index_copy_(0, idx_device, result)
    # index_copy_ is not vectorised on CPU; a few whole-image copies are several times faster.
    for j, i in enumerate(idx.tolist()):
        x[i].copy_(result[j])
    return x


def _crop_kinds(crop_kind: Union[str, Sequence[str]], bsz: int) -> List[str]:
    kinds = [crop_kind] * bsz if isinstance(crop_kind, str) else list(crop_kind)
    if len(kinds) != bsz:
        raise ValueError(f"got {len(kinds)} crop kinds for a batch of {bsz} crops")
    for kind in set(kinds):
        if kind not in CROP_KINDS:
            raise ValueError(f"crop_kind must be one of {CROP_KINDS}, got {kind!r}")
    return kinds


# Columns 1-4 and 7 of the uniforms as factors, shift and sigma: low + span * u (one numpy op for all five).
_FACTOR_COLUMNS = [1, 2, 3, 4, 7]
_FACTOR_LOW = np.array([1.0 - BRIGHTNESS, 1.0 - CONTRAST, 1.0 - SATURATION, -HUE, BLUR_SIGMA[0]])
_FACTOR_SPAN = np.array([2.0 * BRIGHTNESS, 2.0 * CONTRAST, 2.0 * SATURATION, 2.0 * HUE, BLUR_SIGMA[1] - BLUR_SIGMA[0]])


def _draw_photometric_params(
    crop_kind: Union[str, Sequence[str]], bsz: int, generator: Optional[torch.Generator]
) -> Dict[str, np.ndarray]:
    device = generator.device if generator is not None else torch.device("cpu")
    # One RNG call; the derived values are computed in numpy, in as few calls as possible (each costs about a
    # microsecond, more than the arithmetic on a few numbers).
    u = torch.rand(bsz, 13, generator=generator, device=device, dtype=torch.float64).cpu().numpy()
    if isinstance(crop_kind, str):  # one slot for all: scalar probabilities
        _crop_kinds(crop_kind, 1)
        blur_p, solarize_p = BLUR_PROBABILITY[crop_kind], SOLARIZE_PROBABILITY[crop_kind]
    else:
        kinds = _crop_kinds(crop_kind, bsz)
        blur_p = np.array([BLUR_PROBABILITY[k] for k in kinds])
        solarize_p = np.array([SOLARIZE_PROBABILITY[k] for k in kinds])
    factors = u[:, _FACTOR_COLUMNS] * _FACTOR_SPAN + _FACTOR_LOW
    return {
        "jitter": u[:, 0] < JITTER_PROBABILITY,
        "brightness": factors[:, 0],
        "contrast": factors[:, 1],
        "saturation": factors[:, 2],
        "hue": factors[:, 3],
        # argsort of 4 uniforms: a uniformly random permutation (torchvision uses randperm).
        "order": u[:, 9:13].argsort(axis=1),
        "grayscale": u[:, 5] < GRAYSCALE_PROBABILITY,
        "blur": u[:, 6] < blur_p,
        "sigma": factors[:, 4],
        "solarize": u[:, 8] < solarize_p,
    }


def _params_to_torch(params: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in params.items()}


def sample_photometric_params(
    crop_kind: Union[str, Sequence[str]], bsz: int, generator: Optional[torch.Generator] = None
) -> Dict[str, torch.Tensor]:
    """Draw the photometric parameters of ``bsz`` crops (CPU tensors, one entry per crop).

    Keys: ``jitter`` (bool), ``brightness``/``contrast``/``saturation`` (multiplicative factors),
    ``hue`` (shift in turns), ``order`` (B,4) (jitter order: 0 brightness, 1 contrast,
    2 saturation, 3 hue), ``grayscale`` (bool), ``blur`` (bool), ``sigma``, ``solarize`` (bool).
    :func:`photometric_batch` draws exactly these with the same generator calls.
    """
    return _params_to_torch(_draw_photometric_params(crop_kind, bsz, generator))


def _jitter_work_order(p: Dict[str, np.ndarray]) -> np.ndarray:
    """The order in which :func:`_color_jitter` works on a batch drawn with parameters ``p``: by the position of
    the hue step in the jitter order, descending, the crops without jitter last (a stable sort)."""
    hue_position = np.argmax(p["order"] == 3, axis=1)
    return np.argsort(np.where(p["jitter"], 3 - hue_position, 4), kind="stable")


def _color_jitter(x: torch.Tensor, p: Dict[str, np.ndarray]) -> torch.Tensor:
    """torchvision ColorJitter semantics, per image, in each image's own random order.

    Brightness, contrast and saturation are all ``clamp(a * x + (1 - a) * ref, 0, 1)`` with ``ref`` = 0, the mean
    luma, or the per-pixel luma, so a linear step of several images, each with its own op, is one lerp toward each
    image's ``ref``. Each image's sequence is aligned on its hue step: slot ``t + 3 - k`` holds the op at position
    ``t`` of an image whose hue is at position ``k``, so slots 0-2 and 4-6 are lerps and slot 3 is one hue rotation
    for all jittered images (instead of up to four rotations of subsets). The images are worked on sorted by ``k``
    (descending, images without jitter last), which makes the images with an op in any slot a contiguous range:
    every step works on a view of exactly the images it changes, and the batch is put back in its order at the end
    (:func:`photometric_sample` concatenates its local crops in this order, so both copies fall away).
    A step whose factors are all <= 1 is a convex combination of values in [0, 1], so its clamp is skipped.
    """
    bsz = x.shape[0]
    jitter, order = p["jitter"], p["order"]
    n_jitter = int(np.count_nonzero(jitter))
    if n_jitter == 0:
        return x
    perm = _jitter_work_order(p)
    hue_position = np.argmax(order == 3, axis=1)
    permuted = bool(np.count_nonzero(perm != np.arange(bsz)))
    if permuted:
        perm_device = torch.from_numpy(perm).to(x.device, non_blocking=True)
        x = x.index_select(0, perm_device)
    order, hue_position = order[perm], hue_position[perm]
    slots = np.full((bsz, 7), -1)
    slots[np.arange(bsz)[:, None], np.arange(4)[None, :] + 3 - hue_position[:, None]] = order
    slots[n_jitter:] = -1
    is_c, is_s = slots == 1, slots == 2
    brightness, contrast, saturation = (p[k][perm, None] for k in ("brightness", "contrast", "saturation"))
    alpha = np.where(slots == 0, brightness, np.where(is_c, contrast, np.where(is_s, saturation, 1.0)))
    # All coefficients in one host-to-device copy: (7 slots, 4, B, 1, 1, 1).
    table = np.stack([alpha.T, 1.0 - alpha.T, is_s.T, is_c.T], axis=1).astype(np.float32)
    coef = torch.from_numpy(table).to(x.device, non_blocking=True).view(7, 4, bsz, 1, 1, 1)
    # Per slot, as Python values (numpy calls on a few elements cost microseconds each): its range of rows
    # (contiguous by the sort), whether any row adjusts contrast or saturation there, and whether a factor > 1 needs
    # the clamp.
    in_slot = slots >= 0
    first_row = np.argmax(in_slot, axis=0).tolist()
    row_count = np.count_nonzero(in_slot, axis=0).tolist()
    has_c, has_s = is_c.any(axis=0).tolist(), is_s.any(axis=0).tolist()
    needs_clamp = (alpha > 1.0).any(axis=0).tolist()
    for slot in range(7):
        if slot == 3:
            shift = _per_image(p["hue"][perm[:n_jitter]], x.device, 3)
            _adjust_hue(x[:n_jitter], shift, out=x[:n_jitter])
            continue
        if row_count[slot] == 0:
            continue
        lo, hi = first_row[slot], first_row[slot] + row_count[slot]
        xs = x[lo:hi]
        a, one_minus_a, s_mask, c_mask = coef[slot, :, lo:hi].unbind(0)
        if has_c[slot] or has_s[slot]:
            # a x + (1 - a) ref is one lerp toward ref = luma (saturation), mean luma (contrast) or 0 (brightness)
            luma = _luma(xs)
            if has_c[slot]:
                mean_term = luma.mean(dim=(2, 3), keepdim=True).mul_(c_mask)
            ref = luma.mul_(s_mask)
            if has_c[slot]:
                ref.add_(mean_term)
            xs.lerp_(ref, one_minus_a)
        else:
            xs.mul_(a)
        if needs_clamp[slot]:
            xs.clamp_(0.0, 1.0)
    if permuted:
        x = x.index_select(0, torch.from_numpy(np.argsort(perm)).to(x.device, non_blocking=True))
    return x


def _color_jitter_one(x: torch.Tensor, p: Dict[str, np.ndarray]) -> torch.Tensor:
    """:func:`_color_jitter` for a batch of one: the ops in the image's own order with Python floats.

    The same semantics and parameters as the batched blend, without its per-slot coefficient tables (on a
    single crop their numpy bookkeeping costs as much as the pixel work of a 96 px crop). Contrast's
    reference, the mean luma, is the luma of the channel means (the luma is linear).
    """
    if not p["jitter"][0]:
        return x
    for op in p["order"][0].tolist():
        if op == 3:
            x = _adjust_hue(x, float(p["hue"][0]))
            continue
        factor = float(p[("brightness", "contrast", "saturation")[op]][0])
        if op == 0:
            x = x.mul_(factor)
        elif op == 1:
            r, g, b = x.mean(dim=(2, 3)).view(3).tolist()
            x = x.mul_(factor).add_((1.0 - factor) * (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b))
        else:
            # factor * x + (1 - factor) * luma as one lerp (luma taken before x changes in place)
            x = x.lerp_(_luma(x), 1.0 - factor)
        if factor > 1.0:  # below 1 the step is a convex combination of values in [0, 1]
            x = x.clamp_(0.0, 1.0)
    return x


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return _luma(x).expand_as(x).contiguous()


# The float32 value the reference's ``x >= 128 / 255`` compares with, and a power of two that turns the difference of
# two distinct float32 values in [0, 1] into a magnitude of at least 1.
_SOLARIZE_AT = float(np.float32(SOLARIZE_THRESHOLD / 255.0))
_STEP_GAIN = 2.0**40


def _solarize(x: torch.Tensor) -> torch.Tensor:
    """``1 - x`` where ``x >= 128/255`` (uint8 threshold 128), else ``x``; ``x`` in [0, 1], changed in place.

    Written without a boolean mask (comparisons and ``torch.where`` are several times slower than arithmetic on
    CPU: 0.10 instead of 0.33 ms on a 224 px crop here): ``(x - t) * 2^40`` is exactly 0 or positive for
    ``x >= t`` and at most -1 below it (the difference of two float32 values near ``t`` is exact and at least one
    ulp), so its clamp to [-1, 0] plus 1 is the exact 0/1 step, and ``|x - step|`` is ``x`` or the exact ``1 - x``.
    """
    device = x.device
    step = x.sub(_scalar(_SOLARIZE_AT, device)).mul_(_scalar(_STEP_GAIN, device)).clamp_(-1.0, 0.0)
    step.add_(_scalar(1.0, device))
    return x.sub_(step).abs_()


def photometric_batch(
    crops: torch.Tensor,
    crop_kind: Union[str, Sequence[str]],
    generator: Optional[torch.Generator] = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    return_params: bool = False,
):
    """Colour jitter, grayscale, blur, solarize and normalise a batch of crops.

    Runs as batched tensor ops on whatever device ``crops`` is on; every image draws its own
    parameters (see :func:`sample_photometric_params`). ``crops`` is uint8 (B,3,S,S), or float
    in [0, 1]. ``crop_kind`` is ``"global1"``, ``"global2"`` or ``"local"`` (or one of these per
    crop) and selects the blur/solarize probabilities. Random numbers come from ``generator``
    (torch's global RNG when None), are drawn on the generator's device and copied to the CPU,
    where the per-image decisions are made.

    Returns normalised float32 (B,3,S,S); with ``return_params=True`` also the parameter dict.
    """
    x = _planar_float(crops)
    p = _draw_photometric_params(crop_kind, crops.shape[0], generator)
    x = _apply_photometric(x, p, mean, std)
    if return_params:
        return x, _params_to_torch(p)
    return x


def photometric_sample(
    global_crops: Sequence[torch.Tensor],
    local_crops: Sequence[torch.Tensor],
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    return_params: bool = False,
):
    """The per-sample photometry of one image's crops: two global crops (slots ``global1``, ``global2``) and its
    local crops, each a (1,3,S,S) uint8 or float tensor.

    The same random draws and results as ``photometric_batch(global_crops[0], "global1")``,
    ``photometric_batch(global_crops[1], "global2")`` and ``photometric_batch(torch.cat(local_crops), "local")``
    in turn (one RNG call draws the same stream as the three), with less work around the pixels: one draw, and
    the local crops concatenated in the order the colour jitter works in (:func:`_jitter_work_order`), their
    results handed back in the list's order, so that batch is never permuted on its way in and out (two copies of
    it). Returns ``([g1, g2], [l1, ...])`` of (3,S,S) float tensors; with ``return_params=True`` also the
    parameters per slot, ``{"global1": ..., "global2": ..., "local": ...}`` (see
    :func:`sample_photometric_params`).
    """
    p, slots = draw_sample_params(len(global_crops), len(local_crops))
    n_local = len(local_crops)
    globals_out = [
        _apply_photometric(_planar_float(crop), {k: v[slots[kind]] for k, v in p.items()}, mean, std)[0]
        for crop, kind in zip(global_crops, ("global1", "global2"))
    ]
    local_out: List[torch.Tensor] = [None] * n_local  # type: ignore[list-item]
    if n_local:
        p_local = {k: v[2:] for k, v in p.items()}
        work_order = _jitter_work_order(p_local).tolist()
        x = _planar_float(torch.cat([local_crops[i] for i in work_order]))
        x = _apply_photometric(x, {k: v[work_order] for k, v in p_local.items()}, mean, std)
        for row, i in zip(x.unbind(0), work_order):
            local_out[i] = row
    if return_params:
        return globals_out, local_out, params_by_slot(p, slots)
    return globals_out, local_out


def draw_sample_params(n_global: int, n_local: int) -> Tuple[Dict[str, np.ndarray], Dict[str, slice]]:
    """The one parameter draw of a sample's crops (torch's global RNG), shared by both per-sample implementations
    (:func:`photometric_sample`, :func:`dinoscale.data.transforms.photometric_cpu.photometric_sample_cpu`): rows
    ``global1``, ``global2``, then the local crops, and the rows of each slot."""
    if n_global != 2:
        raise ValueError(f"expected 2 global crops, got {n_global}")
    p = _draw_photometric_params(["global1", "global2"] + ["local"] * n_local, 2 + n_local, None)
    return p, {"global1": slice(0, 1), "global2": slice(1, 2), "local": slice(2, 2 + n_local)}


def params_by_slot(p: Dict[str, np.ndarray], slots: Dict[str, slice]) -> Dict[str, Dict[str, torch.Tensor]]:
    """A sample's draw as the parameters of each slot (see :func:`sample_photometric_params`)."""
    return {kind: _params_to_torch({k: v[rows] for k, v in p.items()}) for kind, rows in slots.items()}


def check_crops(crops: torch.Tensor) -> None:
    """Raise unless ``crops`` is (B,3,H,W), uint8 or floating point, and large enough for the blur's padding."""
    if crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must have shape (B,3,H,W), got {tuple(crops.shape)}")
    if crops.shape[0] > 0 and min(crops.shape[-2:]) < BLUR_KERNEL_SIZE // 2 + 1:
        # Reflect padding needs more pixels than the kernel's half width.
        raise ValueError(f"crops must be at least {BLUR_KERNEL_SIZE // 2 + 1} pixels wide, got {tuple(crops.shape)}")
    if crops.dtype != torch.uint8 and not crops.is_floating_point():
        raise TypeError(f"crops must be uint8 or floating point, got {crops.dtype}")


def _planar_float(crops: torch.Tensor) -> torch.Tensor:
    """Checked (B,3,H,W) uint8 or float crops as a new planar float32 tensor in [0, 1]."""
    check_crops(crops)
    # planar float32 whatever the crops' layout (the colour ops work on channel planes)
    if crops.dtype == torch.uint8:
        x = crops.to(torch.float32, memory_format=torch.contiguous_format)
        return x.mul_(_scalar(1.0 / 255.0, x.device))
    return crops.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _apply_photometric(
    x: torch.Tensor, p: Dict[str, np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The photometry of parameters ``p`` on planar float ``x`` (changed in place where possible), normalised."""
    if x.shape[0] == 0:
        return x
    device = x.device
    x = _color_jitter_one(x, p) if x.shape[0] == 1 else _color_jitter(x, p)
    x = _on_subset(x, p["grayscale"], lambda xs, idx: _grayscale(xs))
    x = _on_subset(x, p["blur"], lambda xs, idx: _gaussian_blur(xs, p["sigma"][idx]))
    x = _on_subset(x, p["solarize"], lambda xs, idx: _solarize(xs))
    inv_std = [1.0 / s for s in std]
    # In place: an out-of-place addcmul with these broadcast operands is ~5x slower on CPU.
    bias = [-m * s for m, s in zip(mean, inv_std)]
    x = x.mul_(_constant(f"scale{tuple(std)}", inv_std, (1, 3, 1, 1), device))
    return x.add_(_constant(f"bias{tuple(mean)}{tuple(std)}", bias, (1, 3, 1, 1), device))


def photometric_collated(
    batch: Dict[str, Any],
    generator: Optional[torch.Generator] = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Dict[str, Any]:
    """Apply :func:`photometric_batch` to a collated batch of uint8 crops (``photometric_on_device``).

    ``batch["global_crops"]`` is crop-major (2B,3,G,G): the first half gets the ``global1``
    photometry, the second half ``global2``; ``batch["local_crops"]`` gets ``local``. Returns a
    new dict with float crops; other entries are passed through.
    """
    global_crops = batch["global_crops"]
    if global_crops.shape[0] % 2 != 0:
        raise ValueError(f"global_crops must hold 2B crops (crop-major), got {global_crops.shape[0]}")
    half = global_crops.shape[0] // 2
    out = dict(batch)
    kinds = ["global1"] * half + ["global2"] * half
    out["global_crops"] = photometric_batch(global_crops, kinds, generator, mean=mean, std=std)
    out["local_crops"] = photometric_batch(batch["local_crops"], "local", generator, mean=mean, std=std)
    return out
