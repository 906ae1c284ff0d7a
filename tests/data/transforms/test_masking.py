"""MaskingGenerator: budget, block sizes and shapes, determinism under the passed rng only; SimMIM's cell masks."""

import math
import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from dinoscale.data.transforms.masking import MaskingGenerator, random_cell_masks


def test_never_exceeds_request_and_reaches_it_mostly():
    gen = MaskingGenerator((14, 14))
    rng = random.Random(0)
    shortfall = []
    for request in list(range(0, 100, 3)) * 4:
        mask = gen(request, rng)
        assert mask.shape == (14, 14) and mask.dtype == bool
        assert mask.sum() <= request
        shortfall.append(request - mask.sum())
    # The generator only stops early when 10 proposals in a row add nothing.
    assert np.mean(shortfall) < 1.0 and np.median(shortfall) == 0


def test_blocks_are_at_least_min_num_patches_where_the_budget_allows():
    """Only patches placed once fewer than min_num_patches remained may form smaller blocks,
    and those are fewer than min_num_patches in total."""
    gen = MaskingGenerator((14, 14), min_num_patches=4)
    rng = random.Random(1)
    for request in list(range(10, 120, 7)) * 5:
        mask = gen(request, rng)
        labels, n = ndimage.label(mask)  # 4-connectivity
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes[sizes < 4].sum() < 4, (request, sorted(sizes))
        assert n >= 1


def test_single_block_shape_and_aspect():
    """With min_num_patches == request one rectangle of exactly that area is placed."""
    gen = MaskingGenerator((14, 14), min_num_patches=12)
    rng = random.Random(2)
    aspects = set()
    for _ in range(200):
        mask = gen(12, rng)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == 12 and h * w == 12  # a filled rectangle
        assert 0.3 - 1e-9 <= h / w <= 1 / 0.3 + 1e-9
        aspects.add((h, w))
    assert aspects == {(2, 6), (3, 4), (4, 3), (6, 2)}  # 1x12 and 12x1 are outside (0.3, 3.3)


def test_deterministic_under_rng_and_independent_of_global_rngs():
    gen = MaskingGenerator((8, 10), num_masking_patches=30)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    a = [gen(None, random.Random(5)) for _ in range(3)]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    b = [gen(30, random.Random(5)) for _ in range(3)]
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(gen(30, random.Random(5)), gen(30, random.Random(6)))


def test_mask_ratio_statistics():
    gen = MaskingGenerator((16, 16))
    rng = random.Random(3)
    fractions = [gen(int(0.4 * 256), rng).mean() for _ in range(50)]
    assert all(f <= 0.4 for f in fractions)
    assert np.mean(fractions) > 0.38


def test_bad_arguments():
    gen = MaskingGenerator((4, 4))
    assert gen(0, random.Random(0)).sum() == 0
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(17, random.Random(0))
    with pytest.raises(ValueError, match="rng"):
        gen(3)
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(None, random.Random(0))
    with pytest.raises(ValueError, match="input_size"):
        MaskingGenerator((0, 4))
    with pytest.raises(ValueError, match="max_num_patches"):
        MaskingGenerator((4, 4), min_num_patches=5, max_num_patches=4)
    assert math.isclose(math.exp(MaskingGenerator(4).log_aspect_ratio[1]), 1 / 0.3)


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
