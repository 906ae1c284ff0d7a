"""Decoding: any accepted image input (PIL image, uint8 tensor, encoded bytes) to pixels.

Sources hand out images in one of three forms (see :mod:`dinoscale.data.sources`): a PIL image, a
``uint8`` tensor (C, H, W), or the encoded bytes of a JPEG/PNG/... file. This module turns them into
pixels, and names the errors that mean "this file is bad" (:data:`DECODE_ERRORS`), which the
sources and step sources skip instead of raising.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any, Tuple, Union

import numpy as np
import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode, decode_jpeg

    _TORCHVISION_DECODE_JPEG, _TORCHVISION_RGB = decode_jpeg, ImageReadMode.RGB
except ImportError:  # a torchvision without image decoding: PIL decodes everything
    _TORCHVISION_DECODE_JPEG = _TORCHVISION_RGB = None

ImageInput = Union[Image.Image, torch.Tensor, bytes, bytearray, memoryview]

# Exceptions that mean "this particular file/record is bad" rather than "the code is wrong".
# PIL raises OSError (UnidentifiedImageError, truncated data), SyntaxError or ValueError
# (some plugins on malformed headers), EOFError (truncated multi-frame files) and
# DecompressionBombError (a deliberately huge image).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)


def load_rgb(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode an image file or encoded bytes fully into a PIL RGB image.

    ``convert`` forces the whole file to be decoded, so truncated data raises here (OSError)
    rather than later inside an augmentation.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(source) as img:
        return img.convert("RGB")


def _checked_uint8_chw(image: torch.Tensor) -> torch.Tensor:
    """A uint8 (C,H,W) or (H,W) tensor as (3,H,W): one channel is repeated (a view, no copy)."""
    if image.dtype != torch.uint8:
        raise TypeError(f"image tensor must be uint8 (C,H,W), got dtype {image.dtype}")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensor must have shape (C,H,W) with C in (1, 3), got {tuple(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def as_uint8_chw(image: Any) -> torch.Tensor:
    """A PIL image, encoded bytes or a uint8 (C,H,W) / (H,W) tensor as a uint8 (3,H,W) tensor."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = load_rgb(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        return _checked_uint8_chw(image)
    raise TypeError(f"image must be a PIL image, a uint8 tensor or encoded bytes, got {type(image).__name__}")


def open_image(image: ImageInput) -> Tuple[Union[Image.Image, torch.Tensor], int, int]:
    """Return the image object (PIL, possibly still undecoded, or a uint8 CHW tensor) and its size.

    Opening encoded bytes only parses the header, so the crop geometry can be drawn before
    deciding at which resolution to decode (:func:`decode_for_boxes`).
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
        image = _checked_uint8_chw(image)
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


def _jpeg_to_chw(data: Union[bytes, bytearray, memoryview]) -> torch.Tensor:
    """Decode JPEG bytes with torchvision's libjpeg-turbo decoder to a uint8 (3,H,W) view of (H,W,3) pixels.

    The same pixels as PIL's decoder (same library) in about two thirds of the time: no intermediate
    4-byte-per-pixel image and no copy out of it, and the channels-last layout is the one the uint8 resize
    kernel is fastest on.
    """
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 announces that its image decoders will move to TorchCodec; without them
            # (a later torchvision) decode_for_boxes uses PIL
            warnings.simplefilter("ignore", DeprecationWarning)
            return _TORCHVISION_DECODE_JPEG(raw, mode=_TORCHVISION_RGB)
    except RuntimeError as exc:  # libjpeg's errors (truncated or corrupt data) arrive as RuntimeError
        raise ValueError(f"could not decode image: {exc}") from exc


def decode_for_boxes(
    source: Union[Image.Image, torch.Tensor],
    height: int,
    width: int,
    boxes: torch.Tensor,
    out_sizes: torch.Tensor,
    allow_draft: bool,
    data: Union[bytes, bytearray, memoryview, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode ``source`` (at reduced size when possible) and map ``boxes`` onto the decoded pixels.

    A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size almost for free (DCT scaling). That is
    only done when every crop box stays at least as large as its output size on the reduced
    image, so no crop is upsampled because of it. Boxes are kept in original coordinates and
    rescaled, which leaves the crop geometry distribution untouched. ``allow_draft`` is False for
    a caller's PIL image, whose decoding mode must not be changed behind its back. ``data``, the encoded
    bytes ``source`` was opened from, lets a JPEG decoded at full size go through :func:`_jpeg_to_chw`.
    """
    if isinstance(source, torch.Tensor):
        return source, boxes
    is_jpeg = getattr(source, "format", None) == "JPEG"
    reduced = False
    if allow_draft and is_jpeg and boxes.numel() > 0:
        # Largest reduction that keeps every box >= its output size.
        reduction = torch.minimum(boxes[:, 2], boxes[:, 3]).double().div(out_sizes.double()).min().item()
        if reduction >= 2.0:
            source.draft("RGB", (max(1, math.ceil(width / reduction)), max(1, math.ceil(height / reduction))))
            reduced = True
    if is_jpeg and data is not None and not reduced and _TORCHVISION_DECODE_JPEG is not None:
        chw = _jpeg_to_chw(data)
    else:
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
