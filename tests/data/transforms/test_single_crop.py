"""RandomResizedCropFlip (SimMIM's view): accepted inputs, output shape and dtype; RandomResizedCropFlipPair (BEiT's
two sizes of one crop)."""

import io

import pytest
import torch
from PIL import Image

from dinoscale.data.transforms.single_crop import RandomResizedCropFlip, RandomResizedCropFlipPair


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


def test_pair_is_the_same_box_and_flip_at_two_sizes():
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    pair = RandomResizedCropFlipPair(16, 32, scale=(0.3, 1.0))
    for seed in range(4):  # both flips among them
        torch.manual_seed(seed)
        small, large = pair(image)
        for size, view in ((16, small), (32, large)):
            torch.manual_seed(seed)  # the single view draws the same box and flip from the same RNG state
            assert torch.equal(RandomResizedCropFlip(size, scale=(0.3, 1.0))(image), view)
    with pytest.raises(ValueError, match="second crop size"):
        RandomResizedCropFlipPair(16, 0)
