import io
import random

import pytest
import torch
from PIL import Image

from dinoscale.config import load_config
from dinoscale.methods import build_method
from dinoscale.data.collate import collate_masked_views
from dinoscale.data.transforms.masking import random_cell_masks
from dinoscale.data.transforms.single_crop import RandomResizedCropFlip


def test_cell_masks_cover_whole_cells_at_the_ratio():
    masks = random_cell_masks(5, grid=8, cell=2, mask_ratio=0.6, rng=random.Random(0))
    assert masks.shape == (5, 64) and masks.dtype == torch.bool
    # 16 cells of 2x2 patches, ceil(0.6 * 16) = 10 masked -> 40 patches per image
    assert masks.sum(dim=1).tolist() == [40] * 5
    grid = masks.view(5, 4, 2, 4, 2)
    assert torch.equal(grid.all(dim=(2, 4)), grid.any(dim=(2, 4)))  # every cell is all in or all out
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks, random_cell_masks(5, 8, 2, 0.6, random.Random(0)))  # the rng decides
    with pytest.raises(ValueError, match="cells of 3x3"):
        random_cell_masks(1, 8, 3, 0.5, random.Random(0))


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
    batch = collate_masked_views([(transform(gray), 3), (transform(gray), 7)], rng=random.Random(1), grid=4,
                                 cell=2, mask_ratio=0.5)
    assert batch["images"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [3, 7]
    assert batch["masks"].shape == (2, 16) and batch["masks"].sum().item() == 2 * 8
    # Two ranks with one sample each get the two masks a single rank draws for both samples.
    shares = [collate_masked_views([(transform(gray), 3)], rng=random.Random(1), grid=4, cell=2, mask_ratio=0.5,
                                   rank=r, world_size=2)["masks"] for r in range(2)]
    assert torch.equal(torch.cat(shares), batch["masks"])


def test_config_checks_are_named():
    with pytest.raises(ValueError, match="photometric_on_device"):
        build_method(load_config("quickstart", ["method=simmim", "crops.photometric_on_device=true"]))
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method(load_config("quickstart", ["method=simmim", "simmim.mask_ratio=1.0"]))
    method = build_method(load_config("quickstart", ["method=simmim", "simmim.mask_patch_size=6"]))
    with pytest.raises(ValueError, match="multiple"):
        method.build_collate(patch_size=4)  # 28-pixel crops cannot be cut into 6-pixel cells


def test_networks_have_a_linear_pixel_decoder():
    cfg = load_config("quickstart", ["method=simmim", "simmim.mask_patch_size=4"])
    student, teacher = build_method(cfg).build_networks()
    assert teacher is None and set(student) == {"backbone", "decoder"}
    assert student["decoder"].in_features == cfg.model.embed_dim
    assert student["decoder"].out_features == cfg.model.patch_size**2 * 3


@pytest.mark.parametrize("norm_target", [False, True])
def test_training_lowers_the_loss(runner, norm_target):
    trained, _ = runner.assert_training_lowers_loss("simmim", f"simmim.norm_target={norm_target}")
    assert {"loss", "loss/l1_masked"} <= set(trained[-1])
