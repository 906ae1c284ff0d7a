"""Decoding: JPEG draft mode at reduced size with the crop boxes mapped onto the decoded pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.data.transforms.decode import decode_for_boxes, jpeg_size, open_image, png_size


def test_draft_decode_keeps_geometry(photo, multicrop):
    """A large JPEG is decoded at reduced size when all crops shrink anyway; boxes follow."""
    big = np.array(Image.fromarray(photo).resize((1200, 800), Image.BICUBIC))
    data = multicrop.encode(big)
    source, height, width = open_image(data)
    boxes = torch.tensor([[100, 200, 600, 700], [0, 0, 800, 1200], [10, 20, 150, 120]])
    sizes = torch.tensor([multicrop.G, multicrop.G, multicrop.L])
    chw, scaled = decode_for_boxes(source, height, width, boxes, sizes, allow_draft=True)
    assert chw.shape[1] <= height // 2 and chw.shape[2] <= width // 2  # reduced decode happened
    scaled = torch.tensor(scaled)
    top, left, h, w = scaled.unbind(1)
    assert (top + h <= chw.shape[1]).all() and (left + w <= chw.shape[2]).all()
    assert (torch.minimum(h, w) >= sizes - 1).all()  # still downsampling every crop
    assert torch.allclose(scaled.double() * height / chw.shape[1], boxes.double(), atol=height / chw.shape[1])


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_full_size_jpeg_bytes_decode_to_the_same_pixels_as_pil(photo, multicrop, mode):
    """JPEG bytes decoded at full size go through torchvision's decoder: PIL's pixels, boxes unchanged."""
    from io import BytesIO

    buf = BytesIO()
    Image.fromarray(photo).convert(mode).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    source, height, width = open_image(data)
    boxes = torch.tensor([[0, 0, height, width], [5, 7, 20, 30]])
    chw, scaled = decode_for_boxes(source, height, width, boxes, torch.tensor([height, 16]), True, data=data)
    expected = torch.from_numpy(np.asarray(Image.open(BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(chw, expected) and scaled == [tuple(b) for b in boxes.tolist()]


def test_truncated_jpeg_bytes_raise_a_decode_error(photo, multicrop):
    data = multicrop.encode(photo)
    cut = data[: len(data) // 2]
    source, height, width = open_image(cut)
    with pytest.raises(ValueError, match="could not decode"):
        decode_for_boxes(source, height, width, torch.tensor([[0, 0, 8, 8]]), torch.tensor([8]), True, data=cut)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"exif": b"Exif\x00\x00" + bytes(300)},
                                     {"restart_marker_blocks": 1, "subsampling": 0}])
def test_jpeg_size_reads_the_frame_header_as_pil_does(photo, mode, options):
    """The start-of-frame size of JPEGs with other header segments first (EXIF, progressive tables), any mode."""
    from io import BytesIO

    buf = BytesIO()
    Image.fromarray(photo).convert(mode).save(buf, format="JPEG", quality=85, **options)
    data = buf.getvalue()
    width, height = Image.open(BytesIO(data)).size
    assert jpeg_size(data) == (height, width) == (photo.shape[0], photo.shape[1])
    assert jpeg_size(memoryview(data)) == jpeg_size(bytearray(data)) == (height, width)
    source, h, w = open_image(data)
    assert source is data and (h, w) == (height, width)  # decoded later, by torchvision at full size


def test_jpeg_size_is_none_for_anything_else(photo, multicrop):
    """Not a JPEG, or a header cut before its frame: None (and open_image leaves bytes of neither kind to PIL)."""
    jpeg, png = multicrop.encode(photo), multicrop.encode(photo, fmt="PNG")
    sof = next(i for i in range(2, len(jpeg)) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xC0)
    for data in (png, b"", b"\xff\xd8", jpeg[:sof], jpeg[: sof + 6], b"\xff\xd8\x00" + jpeg[3:], b"GIF89a" + bytes(20)):
        assert jpeg_size(data) is None, data[:12]
    source, height, width = open_image(multicrop.encode(photo, fmt="BMP"))
    assert isinstance(source, Image.Image) and (height, width) == photo.shape[:2]
    with pytest.raises(ValueError, match="could not decode"):
        open_image(jpeg[:sof])


def _png(photo, mode):
    from io import BytesIO

    if mode == "P":
        image = Image.fromarray(photo).quantize(64)
    elif mode == "I;16":
        image = Image.fromarray(photo[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(photo).convert(mode)
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "I;16"])
def test_png_bytes_decode_to_the_same_pixels_as_pil(photo, mode):
    """8-bit grey and RGB PNGs go to torchvision's decoder (the bytes stay the source until decode_for_boxes), every
    other kind to PIL; either way the pixels are PIL's ``convert("RGB")``."""
    from io import BytesIO

    data = _png(photo, mode)
    expected = torch.from_numpy(np.asarray(Image.open(BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    source, height, width = open_image(data)
    assert (height, width) == photo.shape[:2]
    by_torchvision = mode in ("RGB", "L")
    assert (png_size(data) == (height, width)) if by_torchvision else png_size(data) is None
    assert (source is data) == by_torchvision and isinstance(source, Image.Image) != by_torchvision
    boxes = [(0, 0, height, width), (5, 7, 20, 30)]
    chw, mapped = decode_for_boxes(source, height, width, boxes, [height, 16], True, data=data)
    assert torch.equal(chw, expected) and mapped == boxes


def test_png_size_is_none_for_anything_else(photo, multicrop):
    png = _png(photo, "RGB")
    for data in (b"", png[:20], b"\x88" + png[1:], png[:12] + b"IHDX" + png[16:], multicrop.encode(photo)):
        assert png_size(data) is None, data[:16]
    assert png_size(memoryview(png)) == png_size(bytearray(png)) == photo.shape[:2]


def test_corrupt_png_bytes_raise_a_decode_error(photo):
    data = _png(photo, "RGB")
    for bad in (data[: len(data) // 2], data[:40] + bytes(len(data) - 40)):
        source, height, width = open_image(bad)
        assert source is bad  # the header is intact: torchvision's decoder meets the damage
        with pytest.raises(ValueError, match="could not decode"):
            decode_for_boxes(source, height, width, [(0, 0, 8, 8)], [8], True, data=bad)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_images_above_pils_bomb_limit_are_refused_as_pil_refuses_them(photo, multicrop, monkeypatch, fmt):
    """torchvision's decoders have no decompression-bomb limit: an image above PIL's goes to PIL, which refuses it
    beyond twice the limit (a ValueError naming it: a bad file, skipped by the sources) and warns between once and
    twice."""
    from dinoscale.data.transforms.decode import DECODE_ERRORS

    data = multicrop.encode(photo, fmt=fmt)
    pixels = photo.shape[0] * photo.shape[1]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 3)
    with pytest.raises(ValueError, match="decompression bomb") as refused:
        open_image(data)
    assert isinstance(refused.value, DECODE_ERRORS)
    assert isinstance(refused.value.__cause__, Image.DecompressionBombError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        source, height, width = open_image(data)
    assert isinstance(source, Image.Image) and (height, width) == photo.shape[:2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    assert open_image(data)[0] is data  # at the limit: torchvision's, as before
