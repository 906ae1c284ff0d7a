"""The multi-crop views (``dinoscale.methods.views``) with DINOv3's per-step crop sizes (``crops.multi_resolution``),
through the pretraining loader: both ranks' batches of a step have the sizes drawn for it and masks on its patch
grid, and a loader started at a later step (a resume) gives the batches the first one gave. Methods that could not
use the per-step sizes or the Gram crops refuse them."""

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.data.loader import build_pretrain_loader
from dinoscale.methods.registry import build_method
from dinoscale.methods.views import crop_resolutions
from tests.tiny import TINY_NETWORK

MULTI_RES = ["method=dinov2", "crops.multi_resolution.enabled=true", "crops.multi_resolution.global_crops_sizes=[16,24]",
             "crops.multi_resolution.local_crops_sizes=[8,12]", "crops.multi_resolution.weights=[1,1]"]
_g = torch.Generator().manual_seed(0)
IMAGES = [(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=_g), i % 10) for i in range(16)]


def loader(method, seed, *, rank, world_size, start_step=0):
    return build_pretrain_loader(IMAGES, method.build_transform(), method.build_collate(4), batch_size_per_rank=2,
                                 num_workers=0, seed=seed, start_step=start_step, rank=rank, world_size=world_size)


def test_a_step_has_its_crop_sizes_on_every_rank_and_after_a_resume():
    cfg = load_config("quickstart", TINY_NETWORK + MULTI_RES)
    resolutions = crop_resolutions(cfg.crops)
    seed = next(s for s in range(100) if len({resolutions.at_step(k, s) for k in range(6)}) == 2)  # both sizes
    method = build_method(cfg)
    batches = [[next(it) for _ in range(6)] for it in (loader(method, seed, rank=r, world_size=2) for r in range(2))]
    for step in range(6):
        g, l, _ = resolutions.at_step(step, seed)
        for rank in range(2):
            batch = batches[rank][step]
            assert batch["global_crops"].shape == (4, 3, g, g), (step, rank)  # 2 images x 2 global crops
            assert batch["local_crops"].shape == (4, 3, l, l), (step, rank)  # 2 images x 2 local crops
            assert batch["masks"].shape == (4, (g // 4) ** 2), (step, rank)
            assert "gram_crops" not in batch
    resumed = loader(method, seed, rank=1, world_size=2, start_step=3)
    for step in range(3, 6):
        batch, expected = next(resumed), batches[1][step]
        assert batch.keys() == expected.keys()
        for key, value in batch.items():
            assert torch.equal(value, expected[key]) if torch.is_tensor(value) else value == expected[key], key


@pytest.mark.parametrize("method", ["simmim", "pirl"])
def test_methods_with_fixed_crop_sizes_refuse_per_step_sizes(tiny_config, method):
    with pytest.raises(ValueError, match="multi_resolution"):
        build_method(tiny_config(method, *MULTI_RES[1:])).build_transform()


def test_gram_crops_need_gram_anchoring(tiny_config):
    with pytest.raises(ValueError, match="gram.enabled"):
        build_method(tiny_config("dinov2", "crops.gram_crops_size=32")).build_transform()
    build_method(tiny_config("dinov2", "crops.gram_crops_size=32", "gram.enabled=true")).build_transform()


def test_the_photometry_backend_comes_from_the_config(tiny_config):
    """``crops.photometry_backend`` picks the per-sample photometry's implementation; another value is refused when
    the transform is built."""
    default = build_method(tiny_config("dinov2", "crops.photometric_on_device=false")).build_transform()
    assert default.photometry_backend == "opencv"
    tensor = build_method(tiny_config("dinov2", "crops.photometric_on_device=false",
                                      "crops.photometry_backend=torch")).build_transform()
    assert tensor.photometry_backend == "torch"
    torch.manual_seed(0)
    a = default(IMAGES[0][0])
    torch.manual_seed(0)
    b = tensor(IMAGES[0][0])
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert (x - y).abs().max().item() < 5e-5
    with pytest.raises(ValueError, match="photometry_backend must be one of"):
        build_method(tiny_config("dinov2", "crops.photometry_backend=pil")).build_transform()
