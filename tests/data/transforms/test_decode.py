"""Decoding: JPEG draft mode at reduced size with the crop boxes mapped onto the decoded pixels."""

import numpy as np
import torch
from PIL import Image

from dinoscale.data.transforms.decode import decode_for_boxes, open_image


def test_draft_decode_keeps_geometry(photo, multicrop):
    """A large JPEG is decoded at reduced size when all crops shrink anyway; boxes follow."""
    big = np.array(Image.fromarray(photo).resize((1200, 800), Image.BICUBIC))
    data = multicrop.encode(big)
    source, height, width = open_image(data)
    boxes = torch.tensor([[100, 200, 600, 700], [0, 0, 800, 1200], [10, 20, 150, 120]])
    sizes = torch.tensor([multicrop.G, multicrop.G, multicrop.L])
    chw, scaled = decode_for_boxes(source, height, width, boxes, sizes, allow_draft=True)
    assert chw.shape[1] <= height // 2 and chw.shape[2] <= width // 2  # reduced decode happened
    top, left, h, w = scaled.unbind(1)
    assert (top + h <= chw.shape[1]).all() and (left + w <= chw.shape[2]).all()
    assert (torch.minimum(h, w) >= sizes - 1).all()  # still downsampling every crop
    assert torch.allclose(scaled.double() * height / chw.shape[1], boxes.double(), atol=height / chw.shape[1])
