"""MultiCropAugmentation: inputs, shapes, the documented probabilities, crop geometry, parity with
torchvision's functional ops, and the photometric_on_device path."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision.transforms.v2 import functional as TF

from dinoscale.data.transforms.decode import decode_for_boxes, open_image
from dinoscale.data.transforms.geometry import sample_crop_boxes
from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.data.transforms.photometric import photometric_batch, photometric_collated

G, L, NL = 32, 16, 3  # small crops keep the tests fast


def small_aug(**kw):
    args = dict(global_crops_size=G, local_crops_size=L, local_crops_number=NL)
    args.update(kw)
    return MultiCropAugmentation(**args)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Per-sample augmentation runs single-threaded in data-loader workers; on a busy shared CPU
    intra-op threads only add synchronisation cost to these small tensors."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def photo():
    """A real photo, downscaled: (H, W, 3) uint8."""
    return np.array(Image.fromarray(skdata.chelsea()).resize((150, 100), Image.BICUBIC))


def encode(arr, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def check_output(out, dtype=torch.float32, n_local=NL):
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == n_local
    for t in out["global_crops"]:
        assert t.shape == (3, G, G) and t.dtype == dtype
    for t in out["local_crops"]:
        assert t.shape == (3, L, L) and t.dtype == dtype
    if dtype == torch.float32:
        for t in out["global_crops"] + out["local_crops"]:
            assert torch.isfinite(t).all()
            # Normalised [0, 1] data lies within [-mean/std, (1-mean)/std].
            lo = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
            hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
            assert (t >= lo.view(3, 1, 1) - 1e-4).all() and (t <= hi.view(3, 1, 1) + 1e-4).all()


def test_inputs_shapes_and_dtypes(photo):
    aug = small_aug()
    gray = photo.mean(axis=2).astype(np.uint8)
    inputs = {
        "pil_rgb": Image.fromarray(photo),
        "pil_gray": Image.fromarray(gray),
        "pil_rgba": Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])),
        "tensor_chw": torch.from_numpy(photo).permute(2, 0, 1).contiguous(),
        "tensor_gray": torch.from_numpy(gray).unsqueeze(0),
        "jpeg_bytes": encode(photo),
        "png_bytes": encode(photo, "PNG"),
        "gray_jpeg_bytes": encode(gray),
    }
    for name, image in inputs.items():
        torch.manual_seed(0)
        check_output(aug(image))
    # Geometry only: uint8 crops.
    check_output(small_aug(photometric_on_device=True)(inputs["jpeg_bytes"]), dtype=torch.uint8)
    check_output(small_aug(local_crops_number=0)(inputs["pil_rgb"]), n_local=0)


def test_grayscale_tensor_is_repeated_to_three_channels(photo):
    gray = torch.from_numpy(photo[..., 0].copy()).unsqueeze(0)
    out = small_aug(photometric_on_device=True)(gray)
    for t in out["global_crops"] + out["local_crops"]:
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_bad_inputs_raise_clear_errors(photo):
    aug = small_aug()
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(4, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="decode"):
        aug(b"definitely not an image")
    with pytest.raises(ValueError, match="decode"):
        aug(encode(photo)[:200])  # truncated JPEG
    with pytest.raises(TypeError, match="PIL image"):
        aug(photo)  # a numpy array is not an accepted input
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_kind"):
        photometric_batch(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "global3")


def test_seeded_calls_are_reproducible(photo):
    """Only torch's global RNG matters: Python's and numpy's generators are never used."""
    aug = small_aug()
    data = encode(photo)
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


def test_blur_and_solarize_probabilities_per_slot(photo):
    """The documented probabilities (not DINOv2's accidentally inverted ones), counted on the real path."""
    aug = small_aug()
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    n = 400
    blur = torch.zeros(2 + NL)
    solarize = torch.zeros(2 + NL)
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
    assert within(rate[2:].mean().item(), 0.5, n * NL)  # local crops
    assert solarize[0] == 0 and solarize[2:].sum() == 0  # solarize only on global crop 2
    assert within(solarize[1].item() / n, 0.2, n)
    assert within(jitter / n, 0.8, 2 * n)
    assert within(grayscale / n, 0.2, 2 * n)


def test_crop_box_scale_and_aspect_distribution():
    torch.manual_seed(0)
    height, width, n = 300, 400, 4000
    for scale in [(0.05, 0.32), (0.32, 1.0)]:
        boxes = sample_crop_boxes(height, width, n, scale)
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
        frac = (h * w).double() / (height * width)
        # Rounding the sides to whole pixels moves the area by at most a few percent.
        assert frac.min() >= scale[0] * 0.97 and frac.max() <= scale[1] * 1.03
        log_aspect = torch.log(w.double() / h.double())
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        assert log_aspect.min() >= lo - 0.02 and log_aspect.max() <= hi + 0.02
        if scale == (0.05, 0.32):
            # Every proposal fits, so area and log-aspect are uniform: compare deciles.
            for values, a, b in [(frac, scale[0], scale[1]), (log_aspect, lo, hi)]:
                hist = torch.histc(((values - a) / (b - a)).clamp(0, 1 - 1e-9).float(), bins=10, min=0, max=1)
                assert (hist / n - 0.1).abs().max() < 0.025, hist


def test_crop_box_fallback_is_centred_and_within_ratio():
    # A 10 x 1000 strip: no proposal with area >= 90% and aspect <= 4/3 fits.
    torch.manual_seed(0)
    boxes = sample_crop_boxes(10, 1000, 5, (0.9, 1.0))
    assert boxes.tolist() == [[0, 493, 10, 13]] * 5


def test_draft_decode_keeps_geometry(photo):
    """A large JPEG is decoded at reduced size when all crops shrink anyway; crops barely change."""
    big = np.array(Image.fromarray(photo).resize((1200, 800), Image.BICUBIC))
    data = encode(big)
    source, height, width = open_image(data)
    boxes = torch.tensor([[100, 200, 600, 700], [0, 0, 800, 1200], [10, 20, 150, 120]])
    sizes = torch.tensor([G, G, L])
    chw, scaled = decode_for_boxes(source, height, width, boxes, sizes, allow_draft=True)
    assert chw.shape[1] <= height // 2 and chw.shape[2] <= width // 2  # reduced decode happened
    top, left, h, w = scaled.unbind(1)
    assert (top + h <= chw.shape[1]).all() and (left + w <= chw.shape[2]).all()
    assert (torch.minimum(h, w) >= sizes - 1).all()  # still downsampling every crop
    assert torch.allclose(scaled.double() * height / chw.shape[1], boxes.double(), atol=height / chw.shape[1])

    # Same seed -> same boxes; draft-decoded bytes vs the fully decoded image give nearly equal crops.
    aug = small_aug(photometric_on_device=True)
    torch.manual_seed(3)
    from_bytes = aug(data)
    torch.manual_seed(3)
    from_pixels = aug(torch.from_numpy(big).permute(2, 0, 1).contiguous())
    for a, b in zip(from_bytes["global_crops"] + from_bytes["local_crops"],
                    from_pixels["global_crops"] + from_pixels["local_crops"]):
        assert (a.float() - b.float()).abs().mean() < 6.0


def reference_photometry(crop_u8, kind, params, i):
    """Photometry of one crop from its drawn parameters with torchvision's functional tensor ops."""
    x = crop_u8.float() / 255
    if params["jitter"][i]:
        fns = {0: (TF.adjust_brightness, "brightness"), 1: (TF.adjust_contrast, "contrast"),
               2: (TF.adjust_saturation, "saturation"), 3: (TF.adjust_hue, "hue")}
        for op in params["order"][i].tolist():
            fn, key = fns[op]
            x = fn(x, float(params[key][i]))
    if params["grayscale"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params["blur"][i]:
        s = float(params["sigma"][i])
        x = TF.gaussian_blur(x, [9, 9], [s, s])
    if params["solarize"][i]:
        x = torch.where(x >= 128 / 255, 1 - x, x)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def test_photometry_matches_torchvision_ops_for_the_drawn_parameters(photo):
    """Every flag in the returned parameters is really applied, with torchvision's semantics."""
    aug = small_aug(photometric_on_device=True)
    torch.manual_seed(0)
    crops = torch.stack([aug(Image.fromarray(photo))["global_crops"][k % 2] for k in range(48)])
    kinds = ["global1", "global2", "local"] * 16
    gen = torch.Generator().manual_seed(5)
    out, params = photometric_batch(crops, kinds, gen, return_params=True)
    assert params["blur"].any() and params["solarize"].any() and params["grayscale"].any()
    for i in range(len(crops)):
        ref = reference_photometry(crops[i], kinds[i], params, i)
        # torchvision's luma uses 0.2989 instead of 0.299; the rest agrees to float rounding.
        assert (out[i] - ref).abs().max() < 2e-3, i


def test_photometric_on_device_matches_per_sample_distribution(photo):
    """Same geometry (same seeds), photometry per sample vs batched on the collated crops."""
    per_sample = small_aug()
    geometry = small_aug(photometric_on_device=True)
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    n = 150
    a_global, a_local, g_crops, l_crops = [], [], [], []
    for i in range(n):
        torch.manual_seed(i)
        out = per_sample(image)
        a_global.append(torch.stack(out["global_crops"]))
        a_local.append(torch.stack(out["local_crops"]))
        torch.manual_seed(i)
        out = geometry(image)
        g_crops.append(torch.stack(out["global_crops"]))
        l_crops.append(torch.stack(out["local_crops"]))
    batch = {
        "global_crops": torch.cat([torch.stack([g[0] for g in g_crops]), torch.stack([g[1] for g in g_crops])]),
        "local_crops": torch.cat(l_crops),
    }
    b = photometric_collated(batch, torch.Generator().manual_seed(0))
    assert b["global_crops"].dtype == torch.float32 and b["global_crops"].shape == (2 * n, 3, G, G)
    a_g = torch.cat([torch.stack([x[0] for x in a_global]), torch.stack([x[1] for x in a_global])])
    a_l = torch.cat(a_local)

    def stats(x):  # per-crop channel means and stds, then their averages and spreads
        m, s = x.mean(dim=(2, 3)), x.std(dim=(2, 3))
        return torch.stack([m.mean(0), m.std(0), s.mean(0)])

    for a, bb in [(a_g[:n], b["global_crops"][:n]), (a_g[n:], b["global_crops"][n:]), (a_l, b["local_crops"])]:
        sa, sb = stats(a), stats(bb)
        assert (sa - sb).abs().max() < 0.15, (sa, sb)
    # The per-crop blur shows in the high-frequency energy: global crop 1 (always blurred) is
    # smoother than global crop 2 (rarely blurred) in both paths.
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()

    for glob in (a_g, b["global_crops"]):
        assert roughness(glob[:n]) < 0.8 * roughness(glob[n:])
    assert abs(roughness(a_g[:n]) - roughness(b["global_crops"][:n])) < 0.2 * roughness(a_g[:n])
    assert abs(roughness(a_g[n:]) - roughness(b["global_crops"][n:])) < 0.2 * roughness(a_g[n:])


def test_photometric_batch_uses_only_the_given_generator():
    crops = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    torch.manual_seed(0)
    a = photometric_batch(crops, "local", torch.Generator().manual_seed(1))
    torch.manual_seed(99)
    b = photometric_batch(crops, "local", torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_photometric_batch_on_cuda_matches_cpu():
    crops = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8)
    kinds = ["global1", "global2"] * 8
    cpu = photometric_batch(crops, kinds, torch.Generator().manual_seed(1))
    gpu = photometric_batch(crops.cuda(), kinds, torch.Generator().manual_seed(1))
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)
    # A CUDA generator also works (parameters drawn on the GPU, decided on the CPU).
    out = photometric_batch(crops.cuda(), "local", torch.Generator(device="cuda").manual_seed(1))
    assert out.shape == crops.shape and torch.isfinite(out).all()
