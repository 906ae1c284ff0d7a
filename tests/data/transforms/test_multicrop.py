"""MultiCropAugmentation: inputs, shapes, the documented probabilities, reproducibility, draft decoding."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.data.transforms.photometric import photometric_batch


def test_inputs_shapes_and_dtypes(photo, multicrop):
    aug = multicrop.small_aug()
    gray = photo.mean(axis=2).astype(np.uint8)
    inputs = {
        "pil_rgb": Image.fromarray(photo),
        "pil_gray": Image.fromarray(gray),
        "pil_rgba": Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])),
        "tensor_chw": torch.from_numpy(photo).permute(2, 0, 1).contiguous(),
        "tensor_gray": torch.from_numpy(gray).unsqueeze(0),
        "jpeg_bytes": multicrop.encode(photo),
        "png_bytes": multicrop.encode(photo, "PNG"),
        "gray_jpeg_bytes": multicrop.encode(gray),
    }
    for name, image in inputs.items():
        torch.manual_seed(0)
        multicrop.check_output(aug(image))
    # Geometry only: uint8 crops.
    multicrop.check_output(multicrop.small_aug(photometric_on_device=True)(inputs["jpeg_bytes"]), dtype=torch.uint8)
    multicrop.check_output(multicrop.small_aug(local_crops_number=0)(inputs["pil_rgb"]), n_local=0)


def test_grayscale_tensor_is_repeated_to_three_channels(photo, multicrop):
    gray = torch.from_numpy(photo[..., 0].copy()).unsqueeze(0)
    out = multicrop.small_aug(photometric_on_device=True)(gray)
    for t in out["global_crops"] + out["local_crops"]:
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_bad_inputs_raise_clear_errors(photo, multicrop):
    aug = multicrop.small_aug()
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(4, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="decode"):
        aug(b"definitely not an image")
    with pytest.raises(ValueError, match="decode"):
        aug(multicrop.encode(photo)[:200])  # truncated JPEG
    with pytest.raises(TypeError, match="PIL image"):
        aug(photo)  # a numpy array is not an accepted input
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_kind"):
        photometric_batch(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "global3")


def test_seeded_calls_are_reproducible(photo, multicrop):
    """Only torch's global RNG matters: Python's and numpy's generators are never used."""
    aug = multicrop.small_aug()
    data = multicrop.encode(photo)
    random.seed(1), np.random.seed(1), torch.manual_seed(7)
    a = aug(data)
    random.seed(2), np.random.seed(2), torch.manual_seed(7)
    b = aug(data)
    torch.manual_seed(8)
    c = aug(data)
    for x, y, z in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"],
                       c["global_crops"] + c["local_crops"]):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_blur_and_solarize_probabilities_per_slot(photo, multicrop):
    """The documented probabilities (not DINOv2's accidentally inverted ones), counted on the real path."""
    aug = multicrop.small_aug()
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    n = 400
    blur = torch.zeros(2 + multicrop.NL)
    solarize = torch.zeros(2 + multicrop.NL)
    jitter = grayscale = 0.0
    height, width = image.shape[1:]
    for _ in range(n):
        _, params = aug(image, return_params=True)
        # The boxes come from the slot's scale range (up to rounding the sides to pixels).
        frac = (params["boxes"][:, 2] * params["boxes"][:, 3]).double() / (height * width)
        assert ((frac[:2] >= 0.32 * 0.95) & (frac[:2] <= 1.0)).all()
        assert ((frac[2:] >= 0.05 * 0.9) & (frac[2:] <= 0.32 * 1.1)).all()
        slots = [params["global1"], params["global2"], params["local"]]
        blur += torch.cat([q["blur"] for q in slots]).float()
        solarize += torch.cat([q["solarize"] for q in slots]).float()
        jitter += float(torch.cat([q["jitter"] for q in slots[:2]]).float().mean())
        grayscale += float(torch.cat([q["grayscale"] for q in slots[:2]]).float().mean())
    rate = blur / n

    def within(p_hat, p, count):  # 4 standard errors
        return abs(p_hat - p) <= 4 * math.sqrt(p * (1 - p) / count)

    assert rate[0] == 1.0  # global crop 1: always blurred
    assert within(rate[1].item(), 0.1, n)  # global crop 2
    assert within(rate[2:].mean().item(), 0.5, n * multicrop.NL)  # local crops
    assert solarize[0] == 0 and solarize[2:].sum() == 0  # solarize only on global crop 2
    assert within(solarize[1].item() / n, 0.2, n)
    assert within(jitter / n, 0.8, 2 * n)
    assert within(grayscale / n, 0.2, 2 * n)


def test_draft_decoded_bytes_give_nearly_the_crops_of_the_full_image(photo, multicrop):
    """Same seed -> same boxes; draft-decoded bytes vs the fully decoded image give nearly equal crops."""
    big = np.array(Image.fromarray(photo).resize((1200, 800), Image.BICUBIC))
    data = multicrop.encode(big)
    aug = multicrop.small_aug(photometric_on_device=True)
    torch.manual_seed(3)
    from_bytes = aug(data)
    torch.manual_seed(3)
    from_pixels = aug(torch.from_numpy(big).permute(2, 0, 1).contiguous())
    for a, b in zip(from_bytes["global_crops"] + from_bytes["local_crops"],
                    from_pixels["global_crops"] + from_pixels["local_crops"]):
        assert (a.float() - b.float()).abs().mean() < 6.0
