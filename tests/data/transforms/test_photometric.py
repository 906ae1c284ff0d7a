"""photometric_batch / photometric_collated: parity with torchvision's functional ops, the on-device path,
generators, CUDA."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinoscale.data.transforms import photometric
from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.data.transforms.photometric import photometric_batch, photometric_collated, photometric_sample


def reference_photometry(crop_u8, kind, params, i):
    """Photometry of one crop from its drawn parameters with torchvision's functional tensor ops, and the pixels
    where a solarised crop may differ: those within float rounding (5e-4) of the threshold before solarize."""
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
    near_threshold = torch.zeros_like(x, dtype=torch.bool)
    if params["solarize"][i]:
        near_threshold = (x - 128 / 255).abs() < 5e-4
        x = torch.where(x >= 128 / 255, 1 - x, x)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD), near_threshold


def test_photometry_matches_torchvision_ops_for_the_drawn_parameters(photo, multicrop):
    """Every flag in the returned parameters is really applied, with torchvision's semantics."""
    aug = multicrop.small_aug(photometric_on_device=True)
    torch.manual_seed(0)
    crops = torch.stack([aug(Image.fromarray(photo))["global_crops"][k % 2] for k in range(48)])
    kinds = ["global1", "global2", "local"] * 16
    gen = torch.Generator().manual_seed(5)
    out, params = photometric_batch(crops, kinds, gen, return_params=True)
    assert params["blur"].any() and params["solarize"].any() and params["grayscale"].any()
    for i in range(len(crops)):
        ref, near_threshold = reference_photometry(crops[i], kinds[i], params, i)
        # torchvision's luma uses 0.2989 instead of 0.299; the rest agrees to float rounding.
        off = (out[i] - ref).abs() >= 2e-3
        assert not (off & ~near_threshold).any(), i


def test_single_crop_path_matches_torchvision_ops(photo, multicrop):
    """A batch of one (the per-sample path: one call per global crop) has its own jitter code; same semantics."""
    aug = multicrop.small_aug(photometric_on_device=True)
    torch.manual_seed(1)
    crops = [aug(Image.fromarray(photo))["global_crops"][k % 2] for k in range(60)]
    seen = set()
    for i, crop in enumerate(crops):
        kind = ("global1", "global2", "local")[i % 3]
        out, params = photometric_batch(crop[None], kind, torch.Generator().manual_seed(i), return_params=True)
        if params["jitter"][0]:
            seen.add(tuple(params["order"][0].tolist()))
        ref, near_threshold = reference_photometry(crop, kind, params, 0)
        off = (out[0] - ref).abs() >= 2e-3
        # Solarize flips a pixel whose value lies within float rounding of the threshold on one side only.
        assert not (off & ~near_threshold).any(), (i, {k: v[0].tolist() for k, v in params.items()})
    assert len(seen) >= 10  # many jitter orders were exercised


def test_photometric_on_device_matches_per_sample_distribution(photo, multicrop):
    """Same geometry (same seeds), photometry per sample vs batched on the collated crops."""
    per_sample = multicrop.small_aug()
    geometry = multicrop.small_aug(photometric_on_device=True)
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
    assert b["global_crops"].dtype == torch.float32 and b["global_crops"].shape == (2 * n, 3, multicrop.G, multicrop.G)
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


def test_per_sample_path_is_the_three_slot_batches_with_the_same_draws(photo, multicrop):
    """photometric_sample: one draw for a sample's crops and its local crops concatenated in the jitter's working
    order, yet the draws and results of photometric_batch per slot, row for row and in order."""
    aug = multicrop.small_aug(photometric_on_device=True)
    torch.manual_seed(2)
    reordered = 0
    for seed in range(12):
        out = aug(Image.fromarray(photo))
        glob = [c[None] for c in out["global_crops"]]
        local = [c[None] for c in out["local_crops"] * 3]  # 9 local crops, 3 of each
        torch.manual_seed(seed)
        expected = [photometric_batch(glob[0], "global1", return_params=True),
                    photometric_batch(glob[1], "global2", return_params=True),
                    photometric_batch(torch.cat(local), "local", return_params=True)]
        torch.manual_seed(seed)
        g, l, params = photometric_sample(glob, local, return_params=True)
        assert torch.equal(g[0], expected[0][0][0]) and torch.equal(g[1], expected[1][0][0])
        assert torch.equal(torch.stack(l), expected[2][0])
        for kind, (_, expected_params) in zip(("global1", "global2", "local"), expected):
            assert all(torch.equal(params[kind][k], expected_params[k]) for k in expected_params)
        order = photometric._jitter_work_order({k: v.numpy() for k, v in params["local"].items()})
        reordered += bool((order != np.arange(len(local))).any())
    assert reordered >= 10  # the concatenation order really differs from the list's
    g, l = photometric_sample(glob, [])
    assert len(g) == 2 and l == []
    with pytest.raises(ValueError, match="2 global crops"):
        photometric_sample(glob[:1], local)


def test_photometric_batch_uses_only_the_given_generator():
    crops = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    torch.manual_seed(0)
    a = photometric_batch(crops, "local", torch.Generator().manual_seed(1))
    torch.manual_seed(99)
    b = photometric_batch(crops, "local", torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_solarize_is_exactly_the_reference_threshold():
    """The mask-free solarize equals ``torch.where(x >= 128/255, 1 - x, x)`` bit for bit, at the threshold too."""
    t = torch.tensor(128 / 255, dtype=torch.float32)
    near = torch.stack([t, torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(1.0))])
    x = torch.cat([torch.linspace(0, 1, 10001), torch.arange(256) / 255.0, near, torch.tensor([0.5, 0.0, 1.0])])
    x = torch.cat([x, torch.rand(20000)]).view(1, 1, -1, 1).expand(1, 3, -1, 1).contiguous()
    expected = torch.where(x >= 128 / 255, 1.0 - x, x)
    assert torch.equal(photometric._solarize(x.clone()), expected)


@pytest.mark.parametrize("sigma", [0.1, 0.14, 0.2, 0.35, 0.5, 0.65, 1.0, 2.0])
def test_blur_with_negligible_taps_left_out_matches_torchvision(sigma):
    """Small sigmas drop the outer taps (below 2^-30; at 0.1 only the centre is left): same result as the 9-tap
    kernel to float rounding, per image of a batch with different sigmas too."""
    x = torch.rand(3, 3, 30, 40)
    sigmas = np.array([sigma, sigma, 0.1])
    out = photometric._gaussian_blur(x.clone(), sigmas)
    for i, s in enumerate(sigmas):
        ref = TF.gaussian_blur(x[i : i + 1], [9, 9], [float(s), float(s)])
        assert (out[i : i + 1] - ref).abs().max() < 1e-6, (sigma, i)
    assert torch.equal(photometric._gaussian_blur(x.clone(), np.array([0.1, 0.1, 0.1])), x)


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
