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
import struct
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    _TORCHVISION_DECODE_JPEG, _TORCHVISION_DECODE_PNG, _TORCHVISION_RGB = decode_jpeg, decode_png, ImageReadMode.RGB
except ImportError:  # a torchvision without image decoding: PIL decodes everything
    _TORCHVISION_DECODE_JPEG = _TORCHVISION_DECODE_PNG = _TORCHVISION_RGB = None

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


# Start-of-frame markers: baseline, extended, progressive and lossless, Huffman or arithmetic coded (not DHT C4,
# JPG C8, DAC CC, which share the range).
_JPEG_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_size(data: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from the start-of-frame header of JPEG bytes, or None when that header is not found.

    Walks the marker segments up to the first start of frame (the size PIL and libjpeg report), about 1 us
    against 20-130 us for ``PIL.Image.open``, which also parses every other header segment. None for data that is
    not a JPEG, a header cut short, or a frame whose height is left to a later DNL marker (zero here).
    """
    view = memoryview(data)
    if view.nbytes < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    pos, end = 2, view.nbytes
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _JPEG_SOF_MARKERS:
            if pos + 9 > end:
                return None
            height, width = struct.unpack_from(">HH", view, pos + 5)
            return (height, width) if height > 0 and width > 0 else None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length (TEM, RSTn)
            pos += 2
        else:
            pos += 2 + struct.unpack_from(">H", view, pos + 2)[0]
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from the header (IHDR) of an 8-bit grayscale or RGB PNG, or None for anything else.

    Only these two kinds, whose decoding to RGB has one meaning (the grey value repeated, or the pixels
    themselves), go to torchvision's decoder (:func:`decode_for_boxes`); palette, alpha and 16-bit PNGs go through
    PIL's ``convert("RGB")``. Reading the header costs about 1 us, ``PIL.Image.open`` about 10 us.
    """
    view = memoryview(data)
    if view.nbytes < 29 or bytes(view[:8]) != _PNG_SIGNATURE or bytes(view[12:16]) != b"IHDR":
        return None
    width, height, bit_depth, color_type = struct.unpack_from(">IIBB", view, 16)
    if bit_depth != 8 or color_type not in (0, 2) or height == 0 or width == 0:
        return None
    return height, width


def _encoded_size(data: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[int, int]]:
    """The size of JPEG bytes, or of PNG bytes torchvision decodes (:func:`png_size`); None otherwise, and None for
    an image above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): torchvision's decoders have no such
    limit, so those go to PIL, which warns about them or refuses them (``DecompressionBombError``, a bad file)."""
    if _TORCHVISION_DECODE_JPEG is None:
        return None
    size = jpeg_size(data) or png_size(data)
    if size is not None and Image.MAX_IMAGE_PIXELS is not None and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        return None
    return size


def open_image(image: ImageInput) -> Tuple[Union[Image.Image, torch.Tensor, bytes, bytearray, memoryview], int, int]:
    """Return the image object and its size ``(source, height, width)``, without decoding the pixels.

    The source is a uint8 CHW tensor, a PIL image (possibly still undecoded) or, for JPEG bytes whose header
    :func:`jpeg_size` reads or PNG bytes :func:`png_size` accepts, while torchvision's decoders are available, the
    bytes themselves. Only the header is read, so the crop geometry can be drawn before deciding at which
    resolution to decode (:func:`decode_for_boxes`).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        size = _encoded_size(image)
        if size is not None:
            return image, size[0], size[1]
        pil = _open_pil(image)
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


def _open_pil(data: Union[bytes, bytearray, memoryview]) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several exception types for undecodable data
        raise ValueError(f"could not decode image bytes ({len(data)} bytes): {exc}") from exc


def _pil_to_chw(pil: Image.Image) -> torch.Tensor:
    """Decode a PIL image to a uint8 (3,H,W) view of an (H,W,3) buffer (no channel shuffle)."""
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    width, height = pil.size
    # frombuffer on a fresh bytearray avoids both a second copy and the non-writable warning.
    buf = bytearray(pil.tobytes())
    hwc = torch.frombuffer(buf, dtype=torch.uint8).view(height, width, 3)
    return hwc.permute(2, 0, 1)


def _torchvision_to_chw(data: Union[bytes, bytearray, memoryview], decode) -> torch.Tensor:
    """Encoded bytes through one of torchvision's decoders (``decode_jpeg``, ``decode_png``) to uint8 (3,H,W) RGB;
    the library's errors (truncated or corrupt data arrive as RuntimeError) as the ValueError of a bad file."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 announces that its image decoders will move to TorchCodec; without them
            # (a later torchvision) decode_for_boxes uses PIL
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode(raw, mode=_TORCHVISION_RGB)
    except RuntimeError as exc:
        raise ValueError(f"could not decode image: {exc}") from exc


def _jpeg_to_chw(data: Union[bytes, bytearray, memoryview]) -> torch.Tensor:
    """Decode JPEG bytes with torchvision's libjpeg-turbo decoder to a uint8 (3,H,W) view of (H,W,3) pixels.

    The same pixels as PIL's decoder (same library) in about two thirds of the time: no intermediate
    4-byte-per-pixel image and no copy out of it, and the channels-last layout is the one the uint8 resize
    kernel is fastest on.
    """
    return _torchvision_to_chw(data, _TORCHVISION_DECODE_JPEG)


def _png_to_chw(data: Union[bytes, bytearray, memoryview]) -> torch.Tensor:
    """Decode 8-bit grayscale or RGB PNG bytes with torchvision's decoder to a uint8 (3,H,W) tensor: the same pixels
    as PIL's ``open``, ``convert("RGB")`` and copy, in under half the time on a 28 px image
    (``python benchmarks/small_image_crops.py``, its last line)."""
    return _torchvision_to_chw(data, _TORCHVISION_DECODE_PNG)


def decode_for_boxes(
    source: Union[Image.Image, torch.Tensor, bytes, bytearray, memoryview],
    height: int,
    width: int,
    boxes: Sequence[Sequence[int]],
    out_sizes: Sequence[int],
    allow_draft: bool,
    data: Union[bytes, bytearray, memoryview, None] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int, int, int]]]:
    """Decode ``source`` (from :func:`open_image`, at reduced size when possible) and map ``boxes`` onto the pixels.

    ``boxes`` are ``(top, left, height, width)`` in image coordinates (a list of 4-tuples or an (N,4) tensor) and
    ``out_sizes`` the size each box is resized to; returns the uint8 (3,H,W) pixels and the boxes on them as a list
    of 4-tuples. A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size almost for free (DCT scaling, PIL's draft
    mode). That is only done when every crop box stays at least as large as its output size on the reduced image,
    so no crop is upsampled because of it; boxes are drawn in original coordinates and rescaled, which leaves the
    crop geometry distribution untouched. ``allow_draft`` is False for a caller's PIL image, whose decoding mode
    must not be changed behind its back. JPEG bytes decoded at full size go through :func:`_jpeg_to_chw`;
    ``data``, the encoded bytes a PIL ``source`` was opened from, lets it do so for that one too.
    """
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    if isinstance(out_sizes, torch.Tensor):
        out_sizes = out_sizes.tolist()
    boxes = [tuple(int(v) for v in box) for box in boxes]
    if isinstance(source, torch.Tensor):
        return source, boxes
    if isinstance(source, (bytes, bytearray, memoryview)):  # JPEG or PNG bytes whose header open_image read
        if png_size(source) is not None:
            return _png_to_chw(source), boxes
        data, is_jpeg = source, True
    else:
        is_jpeg = getattr(source, "format", None) == "JPEG"
    reduction = 1.0
    if allow_draft and is_jpeg and boxes:
        # Largest reduction that keeps every box >= its output size.
        reduction = min(min(box[2], box[3]) / size for box, size in zip(boxes, out_sizes))
    if is_jpeg and data is not None and reduction < 2.0 and _TORCHVISION_DECODE_JPEG is not None:
        chw = _jpeg_to_chw(data)
    else:
        if not isinstance(source, Image.Image):
            source = _open_pil(source)
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
    scaled = []
    for top, left, box_h, box_w in boxes:
        new_top, new_left = round(top * sy), round(left * sx)
        bottom, right = min(round((top + box_h) * sy), dec_h), min(round((left + box_w) * sx), dec_w)
        scaled.append((new_top, new_left, max(bottom - new_top, 1), max(right - new_left, 1)))
    return chw, scaled
