"""RandomResizedCropFlip (SimMIM's view): accepted inputs, output shape and dtype."""

import io

import pytest
import torch
from PIL import Image

from dinoscale.data.transforms.single_crop import RandomResizedCropFlip


def test_view_transform_accepts_tensors_pil_and_bytes():
    torch.manual_seed(0)
    transform = RandomResizedCropFlip(16, scale=(0.5, 1.0))
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    pil = Image.fromarray(gray[0].numpy()).convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    for image in (gray, gray.expand(3, -1, -1), pil, buf.getvalue()):
        view = transform(image)
        assert view.shape == (3, 16, 16) and view.dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        transform(torch.zeros(3, 8, 8))
