"""Patch masks for masked-image modelling: BEiT-style block masks (BEiT, iBOT/DINOv2) and SimMIM's cell masks.

Block masks (:class:`MaskingGenerator`) are built from random rectangles of patches: each rectangle has
an area drawn uniformly between ``min_num_patches`` and the remaining budget and a log-uniform aspect ratio in
``(min_aspect, max_aspect)``. Rectangles are added until the requested number of patches is
masked or ten proposals in a row fail to add anything. A rectangle is only accepted when the
number of *new* patches it masks is positive and fits the remaining budget, so a mask never
exceeds the request; while the budget is at least ``min_num_patches`` a rectangle must also
cover at least ``min_num_patches`` patches, so every connected block is that large unless the
last few (fewer than ``min_num_patches``) patches of the budget had to be placed apart.

Cell masks (:func:`random_cell_masks`, SimMIM) mask whole cells of a coarser grid.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Tuple, Union

import numpy as np
import torch


class MaskingGenerator:
    """Random block masks over an ``input_size = (h, w)`` grid of patches.

    ``num_masking_patches`` is the default number of patches to mask when ``__call__`` is given
    ``None``. ``max_num_patches`` caps the area of one rectangle (default: the whole grid).
    """

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int]],
        num_masking_patches: Optional[int] = None,
        min_num_patches: int = 4,
        max_num_patches: Optional[int] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        if len(input_size) != 2 or input_size[0] <= 0 or input_size[1] <= 0:
            raise ValueError(f"input_size must be a positive (h, w), got {input_size}")
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        if num_masking_patches is not None and not (0 <= num_masking_patches <= self.num_patches):
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}"
            )
        self.num_masking_patches = num_masking_patches
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_patches if max_num_patches is None else int(max_num_patches)
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches ({self.max_num_patches}) must be >= min_num_patches ({self.min_num_patches})"
            )
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not (0.0 < min_aspect <= max_aspect):
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got ({min_aspect}, {max_aspect})")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = self.log_aspect_ratio
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({math.exp(lo):.3f}, {math.exp(hi):.3f}))"
        )

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        """Try up to 10 rectangles; mask the first acceptable one. Returns the number of new patches."""
        min_area = self.min_num_patches if budget >= self.min_num_patches else 1
        for _ in range(10):
            # random.uniform(a, b) accepts a > b: when the budget is below min_num_patches the
            # target lies between the two, and acceptance below enforces the budget.
            target_area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (1 <= h <= self.height and 1 <= w <= self.width) or h * w < min_area:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: Optional[int] = None, rng: Optional[random.Random] = None) -> np.ndarray:
        """Return a bool (h, w) mask with at most ``num_masking_patches`` True entries."""
        if rng is None:
            raise ValueError("MaskingGenerator needs an explicit rng (random.Random) for reproducibility")
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches
        if num_masking_patches is None:
            raise ValueError("num_masking_patches not given here nor in the constructor")
        if not (0 <= num_masking_patches <= self.num_patches):
            raise ValueError(f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


def random_cell_masks(
    n_images: int, grid: int, cell: int, mask_ratio: float, rng: random.Random
) -> torch.Tensor:
    """Bool ``(n_images, grid*grid)`` masks over a ``grid x grid`` patch grid, True = masked.

    The grid is split into cells of ``cell x cell`` patches; each image masks ``ceil(mask_ratio * n_cells)``
    cells drawn uniformly without replacement.
    """
    if grid % cell != 0:
        raise ValueError(f"the {grid}x{grid} patch grid cannot be split into cells of {cell}x{cell} patches")
    side = grid // cell
    n_cells = side * side
    n_masked = math.ceil(mask_ratio * n_cells)
    masks = np.zeros((n_images, n_cells), dtype=bool)
    for i in range(n_images):
        masks[i, rng.sample(range(n_cells), n_masked)] = True
    # Each cell covers cell x cell patches: repeat along both grid axes.
    masks = masks.reshape(n_images, side, 1, side, 1)
    masks = np.broadcast_to(masks, (n_images, side, cell, side, cell)).reshape(n_images, grid * grid)
    return torch.from_numpy(masks.copy())
