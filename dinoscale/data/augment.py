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

Why it is fast: the image is decoded once (JPEG at reduced size through PIL's draft mode when every
crop is downsampled by at least 2x anyway), each crop is cut out of the uint8 array and resized in
one antialiased uint8 kernel, and the colour operations run as a handful of float32 tensor ops
on the small crops, with all local crops of an image processed as one batch. The photometric part
is one batched function, :func:`photometric_batch`, used both per sample (on CPU, in the data
loader) and per batch on the accelerator (``photometric_on_device=True``), so both paths share
their distribution by construction.

All randomness comes from torch's random number generators (the global one unless a
``generator`` is passed), so a data loader that seeds torch per sample makes every sample
reproducible.
"""

from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image

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
    u = torch.rand(num_crops, num_attempts + 1, 2, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, :num_attempts, 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, :num_attempts, 1])
    box_w = torch.sqrt(target_area * aspect).round()
    box_h = torch.sqrt(target_area / aspect).round()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    # Index of the first attempt that fits (argmax returns the first maximum).
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    box_h = box_h.gather(1, first).squeeze(1)
    box_w = box_w.gather(1, first).squeeze(1)

    if not bool(found.all()):
        # Central fallback crop, clamped to the aspect-ratio range.
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fb_w, fb_h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            fb_w, fb_h = int(round(height * ratio[1])), height
        else:
            fb_w, fb_h = width, height
        box_h = torch.where(found, box_h, torch.full_like(box_h, fb_h))
        box_w = torch.where(found, box_w, torch.full_like(box_w, fb_w))

    # The extra (last) pair of uniforms places the box; a fallback box is centred instead.
    top = torch.floor(u[:, -1, 0] * (height - box_h + 1))
    left = torch.floor(u[:, -1, 1] * (width - box_w + 1))
    top = torch.where(found, top, torch.div(height - box_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - box_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, box_h, box_w], dim=1).long()


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode ``source`` (at reduced size when possible) and map ``boxes`` onto the decoded pixels.

    A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size almost for free (DCT scaling). That is
    only done when every crop box stays at least as large as its output size on the reduced
    image, so no crop is upsampled because of it. Boxes are kept in original coordinates and
    rescaled, which leaves the crop geometry distribution untouched.
    """
    if isinstance(source, torch.Tensor):
        return source, boxes
    if getattr(source, "format", None) == "JPEG" and boxes.numel() > 0:
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


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma."""
    return (x[:, 0:1] * _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` (B,3,H,W) in [0,1] by ``shift`` (B,) turns.

    Value (max) and chroma (max - min) are unchanged, so no full HSV round trip is needed: with
    the hue ``h`` in sextants, wrapped to [0, 6), the channels are ``min + chroma * w`` with
    ``w_R = clamp(|h - 3| - 1, 0, 1)``, ``w_G = clamp(2 - |h - 2|, 0, 1)``,
    ``w_B = clamp(2 - |h - 4|, 0, 1)``. Branches are written as 0/1 float masks because
    ``torch.where`` is ~20x slower than plain arithmetic on CPU.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    max_gb = torch.maximum(g, b)
    maxc = torch.maximum(r, max_gb)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # Which channel is the maximum (ties go to R, then G), as 0/1 floats: sign() of a
    # non-negative difference is 0 or 1, and it is ~3x cheaper than a comparison plus a cast.
    not_r = torch.sign(maxc - r)
    is_r = 1.0 - not_r
    is_g = torch.sign(g - max_gb).add_(1.0).mul_(not_r)  # g - max(g, b) is 0 or negative
    is_b = not_r - is_g
    # hue = ((g - b) if max is R, (b - r) + 2 if G, (r - g) + 4 if B), in sextants.
    hue = is_r * (g - b)
    hue.addcmul_(is_g, b - r).addcmul_(is_b, r - g)
    hue.div_(chroma.clamp(min=1e-12))  # grey pixels: 0 / eps = 0 (their hue is irrelevant)
    hue.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0).add_(6.0 * shift.view(-1, 1, 1))
    hue.sub_(torch.floor(hue * (1.0 / 6.0)).mul_(6.0))
    out = torch.empty_like(x)
    torch.addcmul(minc, chroma, (hue - 3.0).abs_().sub_(1.0).clamp_(0.0, 1.0), out=out[:, 0])
    torch.addcmul(minc, chroma, (hue - 2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0), out=out[:, 1])
    torch.addcmul(minc, chroma, (hue - 4.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0), out=out[:, 2])
    return out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) with a per-image ``sigma`` (B,), reflect padding.

    Written as shifted multiply-adds: a depthwise conv2d with 9-tap kernels is ~10x slower on CPU.
    """
    bsz, channels, height, width = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    padded = F.pad(x, (half, half, half, half), mode="reflect")
    kw = kernel.view(bsz, 1, 1, 1, kernel_size)
    rows = padded[..., 0:width] * kw[..., 0]
    for k in range(1, kernel_size):
        rows.addcmul_(padded[..., k : k + width], kw[..., k])
    out = rows[..., 0:height, :] * kw[..., 0]
    for k in range(1, kernel_size):
        out.addcmul_(rows[..., k : k + height, :], kw[..., k])
    return out


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn(x_subset, cpu_indices)`` to the images selected by the CPU bool ``mask``.

    The selection is decided on the CPU, so a GPU batch needs no synchronisation for it.
    """
    count = int(mask.sum())
    if count == 0:
        return x
    if count == mask.numel():
        return fn(x, slice(None))
    idx = mask.nonzero().squeeze(1)
    idx_device = idx.to(x.device, non_blocking=True)
    return x.index_copy_(0, idx_device, fn(x.index_select(0, idx_device), idx))


def _crop_kinds(crop_kind: Union[str, Sequence[str]], bsz: int) -> List[str]:
    kinds = [crop_kind] * bsz if isinstance(crop_kind, str) else list(crop_kind)
    if len(kinds) != bsz:
        raise ValueError(f"got {len(kinds)} crop kinds for a batch of {bsz} crops")
    for kind in set(kinds):
        if kind not in CROP_KINDS:
            raise ValueError(f"crop_kind must be one of {CROP_KINDS}, got {kind!r}")
    return kinds


def sample_photometric_params(
    crop_kind: Union[str, Sequence[str]], bsz: int, generator: Optional[torch.Generator] = None
) -> Dict[str, torch.Tensor]:
    """Draw the photometric parameters of ``bsz`` crops (CPU tensors, one entry per crop).

    Keys: ``jitter`` (bool), ``brightness``/``contrast``/``saturation`` (multiplicative factors),
    ``hue`` (shift in turns), ``order`` (B,4) (jitter order: 0 brightness, 1 contrast,
    2 saturation, 3 hue), ``grayscale`` (bool), ``blur`` (bool), ``sigma``, ``solarize`` (bool).
    """
    kinds = _crop_kinds(crop_kind, bsz)
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(bsz, 9, generator=generator, device=device).cpu()
    # argsort of uniforms = a uniformly random permutation per crop (torchvision uses randperm).
    order = torch.rand(bsz, 4, generator=generator, device=device).argsort(dim=1).cpu()
    blur_p = torch.tensor([BLUR_PROBABILITY[k] for k in kinds])
    solarize_p = torch.tensor([SOLARIZE_PROBABILITY[k] for k in kinds])
    return {
        "jitter": u[:, 0] < JITTER_PROBABILITY,
        "brightness": 1.0 - BRIGHTNESS + 2.0 * BRIGHTNESS * u[:, 1],
        "contrast": 1.0 - CONTRAST + 2.0 * CONTRAST * u[:, 2],
        "saturation": 1.0 - SATURATION + 2.0 * SATURATION * u[:, 3],
        "hue": -HUE + 2.0 * HUE * u[:, 4],
        "order": order,
        "grayscale": u[:, 5] < GRAYSCALE_PROBABILITY,
        "blur": u[:, 6] < blur_p,
        "sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 7],
        "solarize": u[:, 8] < solarize_p,
    }


def _color_jitter(x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """torchvision ColorJitter semantics, per image, in each image's own random order.

    Brightness, contrast and saturation are all ``clamp(a * x + (1 - a) * ref, 0, 1)`` with
    ``ref`` = 0, the mean luma, or the per-pixel luma, so each of the 4 steps is one blend
    ``alpha * x + beta_s * luma + beta_c * mean(luma)`` over the whole batch (identity
    coefficients for the images doing something else) plus a hue rotation of the images whose
    step is the hue. The coefficient tables and the per-step decisions are made on the CPU.
    With every factor <= 1 a step is a convex combination of values in [0, 1], so its clamp is
    skipped.
    """
    op = p["order"]  # (B, 4)
    jitter = p["jitter"].unsqueeze(1)
    is_b, is_c, is_s = (op == 0) & jitter, (op == 1) & jitter, (op == 2) & jitter
    is_hue = (op == 3) & jitter
    one = torch.ones_like(op, dtype=torch.float32)
    zero = torch.zeros_like(one)
    brightness, contrast, saturation = (p[k].unsqueeze(1).expand_as(one) for k in ("brightness", "contrast", "saturation"))
    alpha = torch.where(is_b, brightness, torch.where(is_c, contrast, torch.where(is_s, saturation, one)))
    beta_s = torch.where(is_s, 1.0 - saturation, zero)
    beta_c = torch.where(is_c, 1.0 - contrast, zero)
    # (4 steps, 3 coefficients, B) -> one copy to the device.
    coef = torch.stack([alpha.t(), beta_s.t(), beta_c.t()], dim=1).contiguous().to(x.device, non_blocking=True)
    any_linear = (is_b | is_c | is_s).any(dim=0).tolist()
    any_luma = (is_c | is_s).any(dim=0).tolist()
    any_contrast = is_c.any(dim=0).tolist()
    needs_clamp = (alpha > 1.0).any(dim=0).tolist()
    view = (-1, 1, 1, 1)
    for step in range(4):
        if any_linear[step]:
            a = coef[step, 0].view(view)
            if any_luma[step]:
                luma = _luma(x)
                ref = luma * coef[step, 1].view(view)
                if any_contrast[step]:
                    ref.add_(luma.mean(dim=(2, 3), keepdim=True).mul_(coef[step, 2].view(view)))
                x = torch.addcmul(ref, x, a)
            else:
                x = x.mul_(a)
            if needs_clamp[step]:
                x = x.clamp_(0.0, 1.0)
        x = _on_subset(x, is_hue[:, step], lambda xs, idx: _adjust_hue(xs, p["hue"][idx].to(x.device)))
    return x


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
    parameters (:func:`sample_photometric_params`). ``crops`` is uint8 (B,3,S,S), or float in
    [0, 1]. ``crop_kind`` is ``"global1"``, ``"global2"`` or ``"local"`` (or one of these per
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
        x = crops.mul(1.0 / 255.0)  # one pass: uint8 * float -> float32
    elif crops.is_floating_point():
        x = crops.to(torch.float32, copy=True)
    else:
        raise TypeError(f"crops must be uint8 or floating point, got {crops.dtype}")
    device = x.device
    p = sample_photometric_params(crop_kind, crops.shape[0], generator)

    x = _color_jitter(x, p)
    x = _on_subset(x, p["grayscale"], lambda xs, idx: _luma(xs).expand_as(xs).contiguous())
    x = _on_subset(x, p["blur"], lambda xs, idx: _gaussian_blur(xs, p["sigma"][idx].to(device)))
    # uint8 threshold 128 on [0, 255] <=> x >= 128/255 on [0, 1].
    threshold = SOLARIZE_THRESHOLD / 255.0
    x = _on_subset(x, p["solarize"], lambda xs, idx: torch.where(xs >= threshold, 1.0 - xs, xs))
    inv_std = 1.0 / torch.tensor(std, dtype=torch.float32)
    scale = inv_std.to(device).view(1, 3, 1, 1)
    bias = (-torch.tensor(mean, dtype=torch.float32) * inv_std).to(device).view(1, 3, 1, 1)
    x = torch.addcmul(bias, x, scale)
    if return_params:
        return x, p
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
    the collated batch on its device.
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
        source, height, width = _open_image(image)
        boxes, flips = self.sample_geometry(height, width)
        n_local = self.local_crops_number
        sizes = torch.tensor([self.global_crops_size] * 2 + [self.local_crops_size] * n_local)
        chw, pixel_boxes = _decode_for_boxes(source, height, width, boxes, sizes)

        box_list = pixel_boxes.tolist()
        flip_list = flips.tolist()
        crops = [
            _resized_crop(chw, box_list[i], int(sizes[i]), flip_list[i]) for i in range(2 + n_local)
        ]
        params: Dict[str, Any] = {"boxes": boxes, "flips": flips, "image_size": (height, width)}
        if self.photometric_on_device:
            out = {
                "global_crops": [crops[0][0], crops[1][0]],
                "local_crops": [c[0] for c in crops[2:]],
            }
        else:
            kw = dict(mean=self.mean, std=self.std, return_params=True)
            # Both global crops in one batch (same size, per-crop blur/solarize probabilities).
            globals_, params["global"] = photometric_batch(torch.cat(crops[:2]), ("global1", "global2"), **kw)
            if n_local > 0:
                local, params["local"] = photometric_batch(torch.cat(crops[2:]), "local", **kw)
                local_list = list(local.unbind(0))
            else:
                local_list = []
            out = {"global_crops": list(globals_.unbind(0)), "local_crops": local_list}
        if return_params:
            return out, params
        return out
