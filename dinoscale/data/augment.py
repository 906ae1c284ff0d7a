"""DINOv2 multi-crop augmentation, written for speed.

The distribution is the one documented for DINOv2 (two global crops, N local crops):

* geometry, per crop: RandomResizedCrop (scale range per crop type, log-uniform aspect ratio in
  (3/4, 4/3), bicubic with antialiasing) and a horizontal flip with p 0.5;
* photometry, per crop: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in
  a random order) with p 0.8, grayscale with p 0.2, Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0))
  with p 1.0 on global crop 1, 0.1 on global crop 2 and 0.5 on each local crop, solarize
  (threshold 128) with p 0.2 on global crop 2 only, then mean/std normalisation.

The reference implementation passes ``1 - p`` to ``RandomApply`` for the blur, so its first global
crop is never blurred and its second one is blurred 90% of the time; here the documented
probabilities are used (see ``BLUR_PROBABILITY``).

Why it is fast: the image is decoded once (JPEG bytes at reduced size through PIL's draft mode
when every crop is downsampled by at least 2x anyway); each crop is cut out of the uint8 array and
resized by one antialiased uint8 kernel; the colour operations are float32 tensor ops written for
few passes and few calls (a 3-step hue rotation without an HSV round trip, jitter steps as one
blend each, separable blur as shifted multiply-adds, per-image decisions in numpy), run per global
crop and once for all local crops of an image; and :func:`dinoscale.cpu_malloc.keep_freed_memory` stops
glibc from returning the temporaries' memory to the kernel after every call (measured: hue rotation
of a 224 x 224 crop 1.6 ms instead of 0.26 ms). The photometric part is one
batched function, :func:`photometric_batch`, used both per sample (on CPU, in the data loader)
and per batch on the accelerator (``photometric_on_device=True``), so both paths share their
distribution by construction. ``tools/bench_data.py`` measures it against the reference PIL
pipeline.

All randomness comes from torch's random number generators (the global one unless a
``generator`` is passed), so a data loader that seeds torch per sample makes every sample
reproducible.
"""

from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinoscale.cpu_malloc import keep_freed_memory

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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

ImageInput = Union[Image.Image, torch.Tensor, bytes, bytearray, memoryview]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def sample_crop_boxes(
    height: int,
    width: int,
    num_crops: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
    num_attempts: int = 10,
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

    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # One RNG call for everything; the per-crop logic is a few scalar operations, far cheaper in
    # plain Python than as tensor ops. The last pair of uniforms places the box.
    draws = torch.rand(num_crops, num_attempts + 1, 2, generator=generator, dtype=torch.float64).tolist()
    boxes = []
    for attempts in draws:
        for u_area, u_aspect in attempts[:num_attempts]:
            target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
            box_w = int(round(math.sqrt(target_area * aspect)))
            box_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < box_w <= width and 0 < box_h <= height:
                u_top, u_left = attempts[num_attempts]
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
    return torch.tensor(boxes, dtype=torch.long)


def _open_image(image: ImageInput) -> Tuple[Union[Image.Image, torch.Tensor], int, int]:
    """Return the image object (PIL, possibly still undecoded, or a uint8 CHW tensor) and its size.

    Opening encoded bytes only parses the header, so the crop geometry can be drawn before
    deciding at which resolution to decode.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            pil = Image.open(io.BytesIO(image))
        except Exception as exc:  # PIL raises several exception types for undecodable data
            raise ValueError(f"could not decode image bytes ({len(image)} bytes): {exc}") from exc
        width, height = pil.size
        return pil, height, width
    if isinstance(image, Image.Image):
        width, height = image.size
        return image, height, width
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensor must be uint8 (C,H,W), got dtype {image.dtype}")
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must have shape (C,H,W) with C in (1, 3), got {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image, int(image.shape[1]), int(image.shape[2])
    raise TypeError(
        "image must be a PIL image, a uint8 tensor (C,H,W) or encoded JPEG/PNG bytes, "
        f"got {type(image).__name__}"
    )


def _pil_to_chw(pil: Image.Image) -> torch.Tensor:
    """Decode a PIL image to a uint8 (3,H,W) view of an (H,W,3) buffer (no channel shuffle)."""
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    width, height = pil.size
    # frombuffer on a fresh bytearray avoids both a second copy and the non-writable warning.
    buf = bytearray(pil.tobytes())
    hwc = torch.frombuffer(buf, dtype=torch.uint8).view(height, width, 3)
    return hwc.permute(2, 0, 1)


def _decode_for_boxes(
    source: Union[Image.Image, torch.Tensor],
    height: int,
    width: int,
    boxes: torch.Tensor,
    out_sizes: torch.Tensor,
    allow_draft: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode ``source`` (at reduced size when possible) and map ``boxes`` onto the decoded pixels.

    A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size almost for free (DCT scaling). That is
    only done when every crop box stays at least as large as its output size on the reduced
    image, so no crop is upsampled because of it. Boxes are kept in original coordinates and
    rescaled, which leaves the crop geometry distribution untouched. ``allow_draft`` is False for
    a caller's PIL image, whose decoding mode must not be changed behind its back.
    """
    if isinstance(source, torch.Tensor):
        return source, boxes
    if allow_draft and getattr(source, "format", None) == "JPEG" and boxes.numel() > 0:
        # Largest reduction that keeps every box >= its output size.
        reduction = torch.minimum(boxes[:, 2], boxes[:, 3]).double().div(out_sizes.double()).min().item()
        if reduction >= 2.0:
            source.draft("RGB", (max(1, math.ceil(width / reduction)), max(1, math.ceil(height / reduction))))
    try:
        chw = _pil_to_chw(source)
    except Exception as exc:
        raise ValueError(f"could not decode image: {exc}") from exc
    dec_h, dec_w = int(chw.shape[1]), int(chw.shape[2])
    if (dec_h, dec_w) == (height, width):
        return chw, boxes
    sy, sx = dec_h / height, dec_w / width
    b = boxes.double()
    top = (b[:, 0] * sy).round()
    left = (b[:, 1] * sx).round()
    bottom = ((b[:, 0] + b[:, 2]) * sy).round().clamp(max=dec_h)
    right = ((b[:, 1] + b[:, 3]) * sx).round().clamp(max=dec_w)
    scaled = torch.stack([top, left, (bottom - top).clamp(min=1), (right - left).clamp(min=1)], dim=1)
    return chw, scaled.long()


def _resized_crop(chw: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """Crop ``box`` out of a uint8 (3,H,W) image, resize to ``size`` (bicubic, antialiased), flip."""
    top, left, box_h, box_w = box
    patch = chw[:, top : top + box_h, left : left + box_w].unsqueeze(0)
    if (box_h, box_w) != (size, size):
        # torch has a vectorised uint8 kernel for antialiased bicubic resizing on CPU; elsewhere
        # (e.g. a CUDA tensor input) go through float32.
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


# --------------------------------------------------------------------------------------------
# Photometry (batched)
# --------------------------------------------------------------------------------------------
#
# On small crops these functions are dominated by per-op overhead (~1-2 us per torch call), so
# they are written to issue few calls: parameters and per-image decisions live in numpy on the
# CPU, constants are cached per device, and a batch of one uses Python floats instead of
# coefficient tensors.

_DEVICE_CONSTANTS: Dict[Tuple[str, torch.device], torch.Tensor] = {}


def _constant(name: str, values: Sequence[float], shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    tensor = _DEVICE_CONSTANTS.get(key)
    if tensor is None:
        tensor = torch.tensor(values, dtype=torch.float32, device=device).view(shape)
        _DEVICE_CONSTANTS[key] = tensor
    return tensor


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma. Elementwise on purpose: a matmul would run in reduced
    precision under an autocast region or with TF32 enabled."""
    r, g, b = x.unbind(1)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _per_image(values: np.ndarray, device: torch.device, ndim: int = 4):
    """A Python float for a batch of one, else a (B,1,...,1) float32 tensor on ``device``."""
    if values.shape[0] == 1:
        return float(values[0])
    return torch.from_numpy(values.astype(np.float32)).to(device, non_blocking=True).view((-1,) + (1,) * (ndim - 1))


def _adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` (B,3,H,W) in [0,1] by ``shift`` turns (float or (B,1,1) tensor).

    Value (max) and chroma (max - min) are unchanged, so no full HSV round trip is needed. With
    the hue ``h`` in sextants, wrapped to [0, 6), the channels are ``min + chroma * w`` with
    ``w_R = clamp(|h - 3| - 1, 0, 1)``, ``w_G = clamp(2 - |h - 2|, 0, 1)``,
    ``w_B = clamp(2 - |h - 4|, 0, 1)``. Before the shift, ``h`` is ``(g - b) / chroma`` when R is
    the maximum, ``(b - r) / chroma + 2`` for G and ``(r - g) / chroma + 4`` for B; the branches
    are 0/1 float masks from ``sign()`` (``torch.where`` is ~20x slower on CPU).
    """
    r, g, b = x.unbind(1)
    max_gb = torch.maximum(g, b)
    maxc = torch.maximum(r, max_gb)
    minc = torch.minimum(torch.minimum(g, b), r)
    chroma = maxc - minc
    not_r = (maxc - r).sign_()  # 0 where R is the maximum (ties go to R), else 1
    is_g = (g - max_gb).sign_().add_(1.0).mul_(not_r)  # G is the maximum (ties between G and B go to G)
    # With is_r = 1 - not_r and is_b = not_r - is_g, the numerator
    # is_r (g - b) + is_g (b - r) + is_b (r - g) = (g - b) + not_r (r + b - 2g) + is_g (b + g - 2r)
    # and the sextant offset 2 is_g + 4 is_b = 4 not_r - 2 is_g.
    hue = g - b
    hue.addcmul_(not_r, (r + b).sub_(g, alpha=2.0))
    hue.addcmul_(is_g, (b + g).sub_(r, alpha=2.0))
    hue.div_(chroma.clamp(min=1e-12))  # grey pixels: 0 / eps = 0 (their hue is irrelevant)
    hue.add_(not_r, alpha=4.0).add_(is_g, alpha=-2.0)
    hue.add_(shift * 6.0)
    hue.sub_(torch.floor(hue * (1.0 / 6.0)).mul_(6.0))
    device = x.device
    weights = (hue.unsqueeze(1) - _constant("hue_centre", (3.0, 2.0, 4.0), (1, 3, 1, 1), device)).abs_()
    weights.mul_(_constant("hue_sign", (1.0, -1.0, -1.0), (1, 3, 1, 1), device))
    weights.add_(_constant("hue_offset", (-1.0, 2.0, 2.0), (1, 3, 1, 1), device)).clamp_(0.0, 1.0)
    return weights.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


def _gaussian_blur(x: torch.Tensor, sigma: np.ndarray, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) with a per-image ``sigma`` (numpy (B,)), reflect padding.

    The kernel is ``exp(-t^2 / (2 sigma^2))`` for ``t = -k//2 .. k//2``, normalised to sum 1 (as
    torchvision). Written as shifted multiply-adds over ``unfold`` views: a depthwise conv2d
    with 9-tap kernels is ~10x slower on CPU.
    """
    bsz, _, height, width = x.shape
    half = kernel_size // 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1)[None, :] / np.asarray(sigma, np.float64)[:, None]) ** 2)
    taps /= taps.sum(axis=1, keepdims=True)  # (B, K)
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
    count = int(mask.sum())
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


def _draw_photometric_params(
    crop_kind: Union[str, Sequence[str]], bsz: int, generator: Optional[torch.Generator]
) -> Dict[str, np.ndarray]:
    kinds = _crop_kinds(crop_kind, bsz)
    device = generator.device if generator is not None else torch.device("cpu")
    # One RNG call; the derived values are computed in numpy (cheaper than tiny tensor ops).
    u = torch.rand(bsz, 13, generator=generator, device=device, dtype=torch.float64).cpu().numpy()
    blur_p = np.array([BLUR_PROBABILITY[k] for k in kinds])
    solarize_p = np.array([SOLARIZE_PROBABILITY[k] for k in kinds])
    return {
        "jitter": u[:, 0] < JITTER_PROBABILITY,
        "brightness": 1.0 - BRIGHTNESS + 2.0 * BRIGHTNESS * u[:, 1],
        "contrast": 1.0 - CONTRAST + 2.0 * CONTRAST * u[:, 2],
        "saturation": 1.0 - SATURATION + 2.0 * SATURATION * u[:, 3],
        "hue": -HUE + 2.0 * HUE * u[:, 4],
        # argsort of 4 uniforms: a uniformly random permutation (torchvision uses randperm).
        "order": np.argsort(u[:, 9:13], axis=1),
        "grayscale": u[:, 5] < GRAYSCALE_PROBABILITY,
        "blur": u[:, 6] < blur_p,
        "sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 7],
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


def _color_jitter(x: torch.Tensor, p: Dict[str, np.ndarray]) -> torch.Tensor:
    """torchvision ColorJitter semantics, per image, in each image's own random order.

    Brightness, contrast and saturation are all ``clamp(a * x + (1 - a) * ref, 0, 1)`` with
    ``ref`` = 0, the mean luma, or the per-pixel luma, so a linear step is one blend
    ``alpha * x + beta_s * luma + beta_c * mean(luma)`` over the whole batch, with identity
    coefficients for the images that do nothing in that step. Each image's sequence is aligned
    on its hue step: slot ``t + 3 - k`` holds the op at position ``t`` of an image whose hue is at
    position ``k``, so slots 0-2 and 4-6 are blends and slot 3 is one hue rotation for the whole
    batch (instead of up to four rotations of subsets). A step whose factors are all <= 1 is a
    convex combination of values in [0, 1], so its clamp is skipped.
    """
    bsz = x.shape[0]
    jitter, order = p["jitter"], p["order"]
    hue_position = np.argmax(order == 3, axis=1)
    slots = np.full((bsz, 7), -1)
    slots[np.arange(bsz)[:, None], np.arange(4)[None, :] + 3 - hue_position[:, None]] = order
    slots[~jitter] = -1
    is_b, is_c, is_s = slots == 0, slots == 1, slots == 2
    brightness, contrast, saturation = (p[k][:, None] for k in ("brightness", "contrast", "saturation"))
    alpha = np.where(is_b, brightness, np.where(is_c, contrast, np.where(is_s, saturation, 1.0)))
    beta_s = np.where(is_s, 1.0 - saturation, 0.0)
    beta_c = np.where(is_c, 1.0 - contrast, 0.0)
    any_linear = (is_b | is_c | is_s).any(axis=0)
    any_luma = (is_c | is_s).any(axis=0)
    any_contrast = is_c.any(axis=0)
    needs_clamp = (alpha > 1.0).any(axis=0)
    if bsz > 1:
        # All coefficients in one host-to-device copy: (7 slots, 3, B, 1, 1, 1).
        table = np.stack([alpha.T, beta_s.T, beta_c.T], axis=1).astype(np.float32)
        coef = torch.from_numpy(table).to(x.device, non_blocking=True).view(7, 3, bsz, 1, 1, 1).unbind(0)
    for slot in range(7):
        if slot == 3:
            x = _on_subset(x, jitter, lambda xs, idx: _adjust_hue(xs, _per_image(p["hue"][idx], xs.device, 3)))
            continue
        if not any_linear[slot]:
            continue
        if bsz == 1:
            a, b_s, b_c = float(alpha[0, slot]), float(beta_s[0, slot]), float(beta_c[0, slot])
        else:
            a, b_s, b_c = coef[slot].unbind(0)
        if any_luma[slot]:
            luma = _luma(x)
            if any_contrast[slot]:
                mean_term = luma.mean(dim=(2, 3), keepdim=True).mul_(b_c)
            ref = luma.mul_(b_s)
            if any_contrast[slot]:
                ref.add_(mean_term)
            x = x.mul_(a).add_(ref)
        else:
            x = x.mul_(a)
        if needs_clamp[slot]:
            x = x.clamp_(0.0, 1.0)
    return x


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return _luma(x).expand_as(x).contiguous()


def _solarize(x: torch.Tensor) -> torch.Tensor:
    # uint8 threshold 128 on [0, 255] <=> x >= 128/255 on [0, 1].
    return torch.where(x >= SOLARIZE_THRESHOLD / 255.0, 1.0 - x, x)


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
    if crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must have shape (B,3,H,W), got {tuple(crops.shape)}")
    if crops.shape[0] > 0 and min(crops.shape[-2:]) < BLUR_KERNEL_SIZE // 2 + 1:
        # Reflect padding needs more pixels than the kernel's half width.
        raise ValueError(f"crops must be at least {BLUR_KERNEL_SIZE // 2 + 1} pixels wide, got {tuple(crops.shape)}")
    if crops.dtype == torch.uint8:
        x = crops.to(torch.float32).mul_(1.0 / 255.0)
    elif crops.is_floating_point():
        x = crops.to(torch.float32, copy=True)
    else:
        raise TypeError(f"crops must be uint8 or floating point, got {crops.dtype}")
    device = x.device
    p = _draw_photometric_params(crop_kind, crops.shape[0], generator)

    if x.shape[0] > 0:
        x = _color_jitter(x, p)
        x = _on_subset(x, p["grayscale"], lambda xs, idx: _grayscale(xs))
        x = _on_subset(x, p["blur"], lambda xs, idx: _gaussian_blur(xs, p["sigma"][idx]))
        x = _on_subset(x, p["solarize"], lambda xs, idx: _solarize(xs))
        inv_std = [1.0 / s for s in std]
        # In place: an out-of-place addcmul with these broadcast operands is ~5x slower on CPU.
        bias = [-m * s for m, s in zip(mean, inv_std)]
        x = x.mul_(_constant(f"scale{tuple(std)}", inv_std, (1, 3, 1, 1), device))
        x = x.add_(_constant(f"bias{tuple(mean)}{tuple(std)}", bias, (1, 3, 1, 1), device))
    if return_params:
        return x, _params_to_torch(p)
    return x


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


# --------------------------------------------------------------------------------------------
# The per-sample transform
# --------------------------------------------------------------------------------------------


class MultiCropAugmentation:
    """DINOv2 multi-crop augmentation: 2 global crops and ``local_crops_number`` local crops.

    ``__call__(image)`` takes a PIL image, a uint8 tensor (C,H,W) (C = 1 is repeated to 3
    channels) or encoded JPEG/PNG bytes, and returns
    ``{"global_crops": [t1, t2], "local_crops": [t, ...]}`` of normalised float32 (3,S,S)
    tensors. With ``photometric_on_device=True`` the crops are uint8 after geometry only, and
    the trainer applies :func:`photometric_collated` (or :func:`photometric_batch` per slot) to
    the collated batch on its device. ``ratio`` is the RandomResizedCrop aspect-ratio range;
    ``tune_allocator`` calls :func:`dinoscale.cpu_malloc.keep_freed_memory` on the first call in each
    process.
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
        source, height, width = _open_image(image)
        boxes, flips = self.sample_geometry(height, width)
        n_local = self.local_crops_number
        sizes = [self.global_crops_size] * 2 + [self.local_crops_size] * n_local
        own_pil = isinstance(image, (bytes, bytearray, memoryview))
        chw, pixel_boxes = _decode_for_boxes(source, height, width, boxes, torch.tensor(sizes), allow_draft=own_pil)
        crops = [
            _resized_crop(chw, box, size, flip) for box, size, flip in zip(pixel_boxes.tolist(), sizes, flips.tolist())
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
