"""MultiCropAugmentation: inputs, shapes, the documented probabilities, reproducibility, draft decoding; DINOv3's
Gram crops and per-step crop sizes."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoscale.data.transforms.geometry import resized_crop
from dinoscale.data.transforms.multicrop import PHOTOMETRY_BACKENDS, CropResolutions, MultiCropAugmentation
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
    with pytest.raises(ValueError, match="ratio"):
        MultiCropAugmentation(ratio=(4.0 / 3.0, 3.0 / 4.0))
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


# ---------------------------------------------------------------- DINOv3: Gram crops and per-step crop sizes


def crops_from_parts(aug, chw, seed, cut):
    """``aug``'s crops rebuilt from the parts the module docstring names, in its order of random draws: the boxes
    and flips, each box resized to its size (the global ones to ``cut``), the photometry per slot. Returns
    ``(global crops (2,3,cut,cut), local crops (nL,3,L,L))``."""
    torch.manual_seed(seed)
    boxes, flips = aug.sample_geometry(chw.shape[1], chw.shape[2])
    sizes = [cut] * 2 + [aug.local_crops_size] * aug.local_crops_number
    crops = [resized_crop(chw, b, s, f) for b, s, f in zip(boxes.tolist(), sizes, flips.tolist())]
    g1, g2 = photometric_batch(crops[0], "global1"), photometric_batch(crops[1], "global2")
    return torch.cat([g1, g2]), photometric_batch(torch.cat(crops[2:]), "local")


def bicubic(x, size):
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def same_crops(a, b, backend):
    """The tensor photometry is bit for bit photometric_batch's; OpenCV's agrees to float32 rounding (normalised
    units, where one uint8 level is about 0.017)."""
    if backend == "torch":
        return torch.equal(a, b)
    return a.shape == b.shape and (a - b).abs().max().item() < 5e-5


@pytest.mark.parametrize("backend", PHOTOMETRY_BACKENDS)
def test_without_gram_crops_the_crops_are_the_pipeline_of_their_parts(photo, multicrop, backend):
    """The options off (and a multi-resolution transform at a step): exactly the DINOv2 pipeline, no new key."""
    chw = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    resolutions = CropResolutions(global_sizes=(48,), local_sizes=(24,), gram_sizes=(None,), weights=(1.0,))
    per_step = multicrop.small_aug(resolutions=resolutions, photometry_backend=backend).at_step(3, seed=0)
    for aug, size in ((multicrop.small_aug(photometry_backend=backend), multicrop.G), (per_step, 48)):
        torch.manual_seed(11)
        out = aug(chw)
        expected_global, expected_local = crops_from_parts(aug, chw, 11, size)
        assert set(out) == {"global_crops", "local_crops"}
        assert same_crops(torch.stack(out["global_crops"]), expected_global, backend)
        assert same_crops(torch.stack(out["local_crops"]), expected_local, backend)


@pytest.mark.parametrize("backend", PHOTOMETRY_BACKENDS)
@pytest.mark.parametrize("gram_size", [64, 16])
def test_gram_crops_are_the_global_boxes_at_the_gram_size(photo, multicrop, gram_size, backend):
    """The same box, flip and photometric draws, rendered at max(global, gram) and resized to each size."""
    G = multicrop.G
    chw = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    aug = multicrop.small_aug(gram_crops_size=gram_size, photometry_backend=backend)
    torch.manual_seed(5)
    out, params = aug(chw, return_params=True)
    cut = max(G, gram_size)
    rendered, expected_local = crops_from_parts(aug, chw, 5, cut)
    torch.manual_seed(5)
    assert torch.equal(params["boxes"], aug.sample_geometry(chw.shape[1], chw.shape[2])[0])
    gram, glob = torch.stack(out["gram_crops"]), torch.stack(out["global_crops"])
    assert gram.shape == (2, 3, gram_size, gram_size) and glob.shape == (2, 3, G, G)
    assert same_crops(gram, rendered if gram_size == cut else bicubic(rendered, gram_size), backend)
    assert same_crops(glob, rendered if G == cut else bicubic(rendered, G), backend)
    assert same_crops(torch.stack(out["local_crops"]), expected_local, backend)  # the local crops do not change
    with pytest.raises(ValueError, match="photometric_on_device"):
        multicrop.small_aug(gram_crops_size=64, photometric_on_device=True)


def test_crop_sizes_are_drawn_per_step_from_the_seed_and_step_alone(photo, multicrop):
    table = dict(global_sizes=(32, 48), local_sizes=(16, 24), gram_sizes=(64, None), weights=(0.25, 0.75))
    rank0, rank1 = CropResolutions(**table), CropResolutions(**table)  # two processes build their own
    draws = [rank0.at_step(step, seed=5) for step in range(400)]
    assert draws == [rank1.at_step(step, seed=5) for step in range(400)]
    assert set(draws) == {(32, 16, 64), (48, 24, None)}
    assert 0.65 < draws.count((48, 24, None)) / 400 < 0.85  # weight 0.75 (binomial sd 0.022)
    assert draws != [rank0.at_step(step, seed=6) for step in range(400)]  # another run draws otherwise
    # a step's transform has that step's sizes, also in a new process (a resume)
    aug = multicrop.small_aug(resolutions=rank0)
    resumed = multicrop.small_aug(resolutions=CropResolutions(**table))
    chw = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    for step in (7, 8, 9, 10):
        g, l, gram = draws[step]
        for transform in (aug.at_step(step, seed=5), resumed.at_step(step, seed=5)):
            out = transform(chw)
            assert out["global_crops"][0].shape == (3, g, g) and out["local_crops"][0].shape == (3, l, l)
            assert ("gram_crops" in out) == (gram is not None)
            if gram is not None:
                assert out["gram_crops"][0].shape == (3, gram, gram)
    assert aug.global_crops_size == multicrop.G and aug.resolutions is rank0  # at_step leaves it as it was
    with pytest.raises(ValueError, match="one global size, local size, gram size and weight"):
        CropResolutions(global_sizes=(32, 48), local_sizes=(16,), gram_sizes=(None, None), weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive sum"):
        CropResolutions(global_sizes=(32,), local_sizes=(16,), gram_sizes=(None,), weights=(0.0,))
    with pytest.raises(ValueError, match="photometric_on_device"):
        multicrop.small_aug(resolutions=rank0, photometric_on_device=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_image_on_the_accelerator_gets_the_tensor_photometry_there(photo, multicrop):
    """OpenCV works on CPU pixels: an image given as a CUDA tensor keeps the tensor photometry, on its device."""
    chw = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    torch.manual_seed(4)
    cpu = multicrop.small_aug(photometry_backend="torch")(chw)
    torch.manual_seed(4)
    gpu = multicrop.small_aug()(chw.cuda())
    for a, b in zip(cpu["global_crops"] + cpu["local_crops"], gpu["global_crops"] + gpu["local_crops"]):
        assert b.device.type == "cuda" and b.shape == a.shape
