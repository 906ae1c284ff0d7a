import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale.models.factory import build_backbone
from dinoscale.viz.attention import (
    attention_maps,
    load_images,
    prepare_image,
    save_attention_maps,
    threshold_maps,
    upsample_maps,
)
from dinoscale.viz.pca import fit_pca, pca_foreground_rgb, pca_rgb, save_pca_images

skimage_data = pytest.importorskip("skimage.data")


def tiny_vit(registers=0):
    torch.manual_seed(0)
    return build_backbone("vit_small", patch_size=16, embed_dim=32, depth=2, num_heads=2, num_register_tokens=registers, img_size=64)


def png_size(path):
    with Image.open(path) as im:
        return im.size  # (width, height)


def test_prepare_image_keeps_aspect_and_crops_to_patches():
    x, display = prepare_image(skimage_data.chelsea(), 16, image_size=48)  # 300x451 -> 48x72 -> 48x64
    assert x.shape == (3, 48, 64) and display.shape == (48, 64, 3)
    assert 0.0 <= display.min() and display.max() <= 1.0
    with pytest.raises(ValueError, match="smaller than one patch"):
        prepare_image(torch.zeros(3, 10, 10, dtype=torch.uint8), 16)


def test_attention_maps_drop_registers_and_match_last_block():
    model = tiny_vit(registers=2)
    x, _ = prepare_image(skimage_data.astronaut(), 16, image_size=64)
    maps = attention_maps(model, x)
    assert maps.shape == (2, 4, 4)
    with torch.no_grad():
        attn = model.get_last_selfattention(x[None])
    torch.testing.assert_close(maps, attn[0, :, 0, 3:].reshape(2, 4, 4))
    # CLS attention over patches is part of a probability row (registers and CLS take the rest).
    assert torch.all(maps.sum(dim=(1, 2)) <= 1.0 + 1e-5)
    assert upsample_maps(maps, 16).shape == (2, 64, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        attention_maps(model, torch.zeros(3, 40, 64))


def test_dinov3_attention_maps_are_transformers_attention_over_the_patches():
    """A DINOv3 backbone (4 storage tokens before the patches) against transformers' DINOv3ViTModel (eager
    attention, the same random weights): the [CLS] row of the last block over the patch tokens, per head."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from dinoscale.hub import load_state_dict_any
    from tests.hub.conftest import randomize_

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4,
                             intermediate_size=128, layerscale_value=1e-5)
    config._attn_implementation = "eager"  # the only one that returns the attention probabilities
    hf = randomize_(DINOv3ViTModel(config)).eval()
    model = build_backbone("dinov3_vits16", embed_dim=32, depth=2, num_heads=2)
    load_state_dict_any(model, hf.state_dict())
    x, _ = prepare_image(skimage_data.coffee(), 16, image_size=48)  # 48 x 64: a 3 x 4 patch grid
    maps = attention_maps(model.eval(), x)
    with torch.no_grad():
        reference = hf(pixel_values=x[None], output_attentions=True).attentions[-1]
    assert maps.shape == (2, 3, 4)
    torch.testing.assert_close(maps, reference[0, :, 0, 5:].reshape(2, 3, 4), rtol=0, atol=1e-6)


def test_threshold_keeps_smallest_set_with_the_mass():
    maps = torch.tensor([[[0.5, 0.3], [0.15, 0.05]]])
    assert threshold_maps(maps, 0.6).tolist() == [[[True, True], [False, False]]]
    assert threshold_maps(maps, 0.5).tolist() == [[[True, False], [False, False]]]
    assert threshold_maps(maps, 0.9).tolist() == [[[True, True], [True, False]]]
    assert threshold_maps(maps, 1.0).all()


def test_attention_pictures_for_a_real_photo(tmp_path):
    model = tiny_vit()
    out = save_attention_maps(model, skimage_data.astronaut(), tmp_path, "astronaut", image_size=64, threshold=0.6)
    assert png_size(out["paths"]["mean"]) == (64, 64)
    assert len(out["paths"]["heads"]) == 2
    assert all(png_size(p) == (64, 64) for p in out["paths"]["heads"])
    assert out["paths"]["figure"].stat().st_size > 1000
    # A non-square image at another resolution (multiple of the patch size).
    out = save_attention_maps(model, skimage_data.coffee(), tmp_path, "coffee", image_size=48)
    assert png_size(out["paths"]["mean"]) == (64, 48)  # 400x600 -> 48x72 -> crop 48x64
    assert out["maps"].shape == (2, 3, 4)


class BlobFeatureModel(torch.nn.Module):
    """Patch feature = f(mean brightness of the patch): a bright blob is 'foreground'."""

    patch_size = 8

    def __init__(self, flip=False):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(-1.0 if flip else 1.0))
        g = torch.Generator().manual_seed(0)
        self.fg_dir = torch.nn.Parameter(torch.randn(16, generator=g))
        self.colour = torch.nn.Parameter(torch.randn(3, 16, generator=g) * 0.3)

    def forward_features(self, x):
        patches = torch.nn.functional.avg_pool2d(x, 8)  # (1, 3, h, w) mean colour per patch
        bright = (patches.mean(1) > 0).float().flatten(1)[..., None]  # (1, N, 1)
        colour = patches.flatten(2).transpose(1, 2) @ self.colour  # (1, N, 16)
        tokens = self.scale * 4 * bright * self.fg_dir + bright * colour
        return {"x_norm_patchtokens": tokens}


@pytest.mark.parametrize("flip", [False, True])
def test_pca_recovers_the_foreground_whatever_the_sign(flip):
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[:, 16:48, 24:56] = 255  # a bright rectangle, 4x4 patches, away from the border
    image[0, 16:32, 24:56] = 120  # with two colour parts inside
    model = BlobFeatureModel(flip=flip)
    x, _ = prepare_image(image, 8)
    from dinoscale.viz.pca import patch_features

    (feats,) = patch_features(model, [x])
    (res,) = pca_foreground_rgb([feats], threshold=0.5)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 3:7] = True
    assert torch.equal(res["foreground"], expected)
    assert torch.all(res["rgb"][~expected] == 0)
    # The two colour parts of the foreground get different colours.
    assert not torch.allclose(res["rgb"][2, 3], res["rgb"][5, 3])
    # Forcing the opposite sign swaps foreground and background.
    (other,) = pca_foreground_rgb([feats], threshold=0.5, sign="flip")
    assert torch.equal(other["foreground"], ~expected)


def test_fit_pca_orthonormal_and_ordered():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    mean, comps = fit_pca(data, 4)
    torch.testing.assert_close(comps @ comps.T, torch.eye(4), atol=1e-5, rtol=0)
    assert comps[0].abs().argmax() == 0 and comps[1].abs().argmax() == 1


def test_pca_rgb_shows_the_first_three_components_scaled_over_all_images():
    # Two 3x4 images whose 8-dim features are three known coordinates along a rotated orthonormal basis, plus a
    # constant. The coordinates are centred, uncorrelated and of variances 25 > 4 > 1 (orthonormal columns of a
    # centred matrix, scaled), so the principal components are exactly the basis vectors: each RGB channel must be
    # one coordinate, min-max scaled over both images (the sign of a component is arbitrary: c or 1 - c).
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(24, 3, generator=g)
    coords = torch.linalg.qr(raw - raw.mean(dim=0))[0] * torch.tensor([5.0, 2.0, 1.0])
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:, :3]  # orthonormal columns
    feats = (coords @ basis.T + 3.0).reshape(2, 3, 4, 8)
    rgb = torch.cat([c.reshape(-1, 3) for c in pca_rgb([feats[0], feats[1]])])
    assert rgb.shape == (24, 3)
    for ch in range(3):
        c = coords[:, ch]
        scaled = (c - c.min()) / (c.max() - c.min())
        assert torch.allclose(rgb[:, ch], scaled, atol=1e-4) or torch.allclose(rgb[:, ch], 1 - scaled, atol=1e-4)
    (one,) = pca_rgb([feats[0]], n_components=1)  # only red
    assert one.shape == (3, 4, 3) and torch.all(one[..., 1:] == 0) and one[..., 0].min() == 0 and one[..., 0].max() == 1


def test_pca_pictures_for_real_photos(tmp_path):
    model = tiny_vit()
    images = load_images(["astronaut", "chelsea"])
    out = save_pca_images(model, images, tmp_path, image_size=64, threshold=0.5)
    assert [p.name for p in out["paths"]["pca"]] == ["astronaut_pca.png", "chelsea_pca.png"]
    assert png_size(out["paths"]["pca"][0]) == (64, 64)
    assert png_size(out["paths"]["pca"][1]) == (96, 64)  # 300x451 -> 64x96 (already patch multiples)
    assert all(p.stat().st_size > 1000 for p in out["paths"]["figures"])
    assert out["paths"]["grid"].is_file()
    pixels = np.asarray(Image.open(out["paths"]["pca"][0]).convert("RGB"))
    fg = out["results"][0]["foreground"]
    assert 0 < int(fg.sum()) < fg.numel()
    # Background patches are black in the written picture.
    by, bx = np.argwhere(~fg.numpy())[0]
    assert pixels[by * 16 + 8, bx * 16 + 8].tolist() == [0, 0, 0]


def test_load_images_names_and_errors(tmp_path):
    names = [n for n, _ in load_images(["skimage"])]
    assert names == ["astronaut", "chelsea", "coffee", "rocket"]
    path = tmp_path / "x.png"
    Image.new("L", (20, 10)).save(path)
    ((name, array),) = load_images([str(path)])
    assert name == "x" and array.shape == (10, 20, 3)
    with pytest.raises(FileNotFoundError, match="neither an image file"):
        load_images(["no_such_sample_or_file"])
