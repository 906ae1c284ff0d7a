"""collate_multicrop: keys/shapes, crop-major order, DINOv2 mask allocation, index/weight consistency;
collate_masked_views (SimMIM) and collate_block_masked_views (BEiT): shapes, labels, masks drawn for the global
batch."""

import random

import numpy as np
import pytest
import torch

from dinoscale.data.collate import collate_block_masked_views, collate_masked_views, collate_multicrop
from dinoscale.data.transforms.masking import MaskingGenerator
from dinoscale.data.transforms.single_crop import RandomResizedCropFlip, RandomResizedCropFlipPair

KEYS = {
    "global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "n_masked_patches", "upperbound", "labels"
}


def make_samples(batch_size, n_local=3, g=8, l=4, dtype=torch.float32):
    """Crop (sample i, slot k) is filled with the value 10 * i + k."""
    samples = []
    for i in range(batch_size):
        crops = {
            "global_crops": [torch.full((3, g, g), 10 * i + k, dtype=dtype) for k in range(2)],
            "local_crops": [torch.full((3, l, l), 10 * i + 2 + k, dtype=dtype) for k in range(n_local)],
        }
        samples.append((crops, i if i % 3 else -1))
    return samples


def collate(samples, seed=0, grid=(6, 6), **kw):
    gen = MaskingGenerator(grid, max_num_patches=int(0.5 * grid[0] * grid[1]))
    return collate_multicrop(samples, mask_generator=gen, n_tokens=grid[0] * grid[1], rng=random.Random(seed), **kw)


def test_keys_shapes_dtypes_and_crop_major_order():
    b, n_local = 4, 3
    out = collate(make_samples(b, n_local))
    assert set(out) == KEYS
    assert out["global_crops"].shape == (2 * b, 3, 8, 8)
    assert out["local_crops"].shape == (n_local * b, 3, 4, 4)
    for k in range(2):
        for i in range(b):
            assert (out["global_crops"][k * b + i] == 10 * i + k).all()
    for k in range(n_local):
        for i in range(b):
            assert (out["local_crops"][k * b + i] == 10 * i + 2 + k).all()
    assert out["masks"].shape == (2 * b, 36) and out["masks"].dtype == torch.bool
    assert out["mask_indices"].dtype == torch.long and out["mask_indices"].dim() == 1
    assert out["masks_weight"].dtype == torch.float32
    assert out["n_masked_patches"].shape == (1,) and out["n_masked_patches"].dtype == torch.long
    assert isinstance(out["upperbound"], int)
    assert out["labels"].tolist() == [-1, 1, 2, -1]


def test_gram_crops_are_stacked_crop_major_like_the_global_crops():
    b = 3
    samples = make_samples(b)
    for i, (crops, _) in enumerate(samples):
        crops["gram_crops"] = [torch.full((3, 16, 16), 10 * i + k, dtype=torch.float32) for k in range(2)]
    out = collate(samples)
    plain = collate(make_samples(b))
    assert set(out) == KEYS | {"gram_crops"} and set(plain) == KEYS
    assert out["gram_crops"].shape == (2 * b, 3, 16, 16)
    for k in range(2):
        for i in range(b):
            assert (out["gram_crops"][k * b + i] == 10 * i + k).all()  # row j: the image of global crop j
    assert all(torch.equal(out[k], plain[k]) for k in KEYS - {"upperbound"})  # nothing else changes
    assert out["upperbound"] == plain["upperbound"]
    del samples[1][0]["gram_crops"]
    with pytest.raises(ValueError, match="gram_crops"):
        collate(samples)


def test_uint8_crops_keep_their_dtype_and_empty_local_crops():
    out = collate(make_samples(2, n_local=0, dtype=torch.uint8), local_crops_size=4)
    assert out["global_crops"].dtype == torch.uint8
    assert out["local_crops"].shape == (0, 3, 4, 4) and out["local_crops"].dtype == torch.uint8


@pytest.mark.parametrize("batch_size,probability", [(8, 0.5), (5, 0.3), (3, 1.0), (4, 0.0)])
def test_number_of_masked_images_and_index_weight_consistency(batch_size, probability):
    out = collate(make_samples(batch_size, n_local=1), grid=(8, 8), mask_probability=probability,
                  mask_ratio_tuple=(0.2, 0.5))
    masks = out["masks"]
    per_image = masks.sum(dim=1)
    assert int((per_image > 0).sum()) == int(2 * batch_size * probability)
    assert torch.equal(out["mask_indices"], masks.flatten().nonzero().flatten())
    m = out["mask_indices"].numel()
    assert out["n_masked_patches"].item() == m and out["masks_weight"].shape == (m,)
    image_of = out["mask_indices"] // masks.shape[1]
    assert torch.allclose(out["masks_weight"], 1.0 / per_image[image_of].float())
    # Each masked image carries total weight 1.
    assert torch.isclose(out["masks_weight"].sum(), (per_image > 0).sum().float())
    assert out["upperbound"] >= m
    assert (per_image <= int(64 * 0.5)).all()


def test_mask_ratios_are_spread_over_the_range():
    """The i-th masked image draws its ratio from the i-th bin of linspace(lo, hi, n + 1)."""
    b = 32
    out = collate(make_samples(b, n_local=0), grid=(16, 16), mask_probability=0.5, mask_ratio_tuple=(0.1, 0.5),
                  local_crops_size=4)
    counts = np.sort(out["masks"].sum(dim=1).numpy())
    masked = counts[counts > 0]
    assert len(masked) == b  # int(2B * 0.5)
    expected = np.array([256 * (0.1 + 0.4 * (i + 0.5) / b) for i in range(b)])
    # Sorted achieved counts follow the bin centres (within a bin width plus generator shortfall).
    assert np.abs(masked - expected).max() <= 256 * 0.4 / b + 4
    # DINOv2's upper bound: sum over masked images of int(N * upper bin edge).
    edges = np.linspace(0.1, 0.5, b + 1)
    assert out["upperbound"] == sum(int(256 * e) for e in edges[1:])


def test_deterministic_under_fixed_rng_and_order_is_shuffled():
    samples = make_samples(6)
    a, b, c = collate(samples, seed=1), collate(samples, seed=1), collate(samples, seed=2)
    for key in ("masks", "mask_indices", "masks_weight"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["masks"], c["masks"])
    # Shuffled: over several seeds, masked images are not always the first ones.
    firsts = {tuple((collate(samples, seed=s)["masks"].sum(1) > 0).tolist()) for s in range(6)}
    assert len(firsts) > 1


def test_bad_batches_raise():
    samples = make_samples(3)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_multicrop(samples, mask_generator=MaskingGenerator((4, 4)), n_tokens=15, rng=random.Random(0))
    uneven = make_samples(2)
    uneven[1][0]["local_crops"].pop()
    with pytest.raises(ValueError, match="same number of local_crops"):
        collate(uneven)
    sizes = make_samples(2)
    sizes[0][0]["global_crops"][0] = torch.zeros(3, 7, 7)
    with pytest.raises(ValueError, match="same shape"):
        collate(sizes)
    with pytest.raises(TypeError, match="label"):
        collate([(samples[0][0], "cat")])
    with pytest.raises(TypeError, match="rng"):
        collate_multicrop(samples, mask_generator=MaskingGenerator((4, 4)), n_tokens=16, rng=None)
    with pytest.raises(ValueError, match="empty"):
        collate([])


@pytest.mark.parametrize("world_size", [2, 3])
def test_masks_do_not_depend_on_how_the_global_batch_is_split(world_size):
    """Rank r's masks are rows of the 1-rank batch's masks (crop-major), so N ranks see what 1 rank sees."""
    per_rank = 4
    samples = make_samples(per_rank * world_size)
    single = collate(samples, seed=7)
    gb = per_rank * world_size
    n_masked = 0
    for rank in range(world_size):
        part = collate(samples[rank * per_rank:(rank + 1) * per_rank], seed=7, rank=rank, world_size=world_size)
        rows = [c * gb + j for c in range(2) for j in range(rank * per_rank, (rank + 1) * per_rank)]
        assert torch.equal(part["masks"], single["masks"][rows])
        n_masked += int(part["masks"].any(dim=1).sum())
    assert n_masked == int(single["masks"].any(dim=1).sum()) == int(2 * gb * 0.5)
    with pytest.raises(ValueError, match="rank"):
        collate(samples[:per_rank], rank=world_size, world_size=world_size)


def test_masked_views_collate_draws_the_global_batch_masks():
    torch.manual_seed(0)
    transform = RandomResizedCropFlip(16, scale=(0.5, 1.0))
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    batch = collate_masked_views([(transform(gray), 3), (transform(gray), 7)], rng=random.Random(1), grid=4,
                                 cell=2, mask_ratio=0.5)
    assert batch["images"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [3, 7]
    assert batch["masks"].shape == (2, 16) and batch["masks"].sum().item() == 2 * 8
    # Two ranks with one sample each get the two masks a single rank draws for both samples.
    shares = [collate_masked_views([(transform(gray), 3)], rng=random.Random(1), grid=4, cell=2, mask_ratio=0.5,
                                   rank=r, world_size=2)["masks"] for r in range(2)]
    assert torch.equal(torch.cat(shares), batch["masks"])


def test_block_masked_views_collate_single_views_and_pairs():
    torch.manual_seed(0)
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    generator = MaskingGenerator((4, 4), num_masking_patches=6, min_num_patches=2)
    options = dict(mask_generator=generator, num_masking_patches=6)
    single = RandomResizedCropFlip(16, scale=(0.5, 1.0))
    batch = collate_block_masked_views([(single(gray), 3), (single(gray), 7)], rng=random.Random(1), **options)
    assert set(batch) == {"images", "masks", "mask_indices", "n_masked_global", "labels"}
    assert batch["images"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [3, 7]
    assert batch["masks"].shape == (2, 16) and batch["masks"].dtype == torch.bool
    assert torch.equal(batch["mask_indices"], batch["masks"].flatten().nonzero().squeeze(1))
    assert batch["n_masked_global"].ndim == 0 and batch["n_masked_global"].item() == batch["masks"].sum().item()
    # each image's mask is the generator's, seeded by the step and the image's place in the global batch
    image_seed = random.Random(1).getrandbits(63)
    for g in range(2):
        expected = generator(6, random.Random(f"{image_seed}:{g}")).flatten()
        assert torch.equal(batch["masks"][g], torch.from_numpy(expected))
    pair = RandomResizedCropFlipPair(16, 8, scale=(0.5, 1.0))
    paired = collate_block_masked_views([(pair(gray), 3), (pair(gray), 7)], rng=random.Random(1), **options)
    assert paired["tokenizer_images"].shape == (2, 3, 8, 8) and torch.equal(paired["masks"], batch["masks"])
    # rank 1 of 2 holds the second image, with the global count
    share = collate_block_masked_views([(single(gray), 7)], rng=random.Random(1), rank=1, world_size=2, **options)
    assert torch.equal(share["masks"], batch["masks"][1:]) and share["n_masked_global"] == batch["n_masked_global"]
    with pytest.raises(ValueError, match="view pairs"):
        collate_block_masked_views([(single(gray), 3), (pair(gray), 7)], rng=random.Random(1), **options)
