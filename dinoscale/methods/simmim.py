"""SimMIM (Xie et al. 2022): predict the raw pixels of randomly masked patches with a linear decoder.

Networks: the ViT backbone, whose ``mask_token`` replaces the masked patch embeddings (``masks=``), and a
linear decoder from each output patch token to its ``patch_size^2 * 3`` pixels (SimMIM's one-layer head). No
teacher.
Views: one crop per image, RandomResizedCrop (``simmim.crop_scale``, aspect ratio 3/4-4/3) to
``crops.global_crops_size`` with a horizontal flip and mean/std normalisation; no colour augmentation, so
``crops.photometric_on_device`` must stay false.
Masks: drawn in the collate for the global batch (seeded per step, like DINOv2's): ``simmim.mask_ratio`` of
the cells of a grid of ``simmim.mask_patch_size`` pixels, each cell covering ``(mask_patch_size / patch_size)^2``
patches.
Loss: L1 on the masked patches only (``dinoscale.losses.simmim``), targets optionally standardised per patch
(``simmim.norm_target``).
"""

from __future__ import annotations

import math
import random
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from dinoscale import distributed
from dinoscale.data.augment import IMAGENET_MEAN, IMAGENET_STD, sample_crop_boxes
from dinoscale.data.datasets import load_rgb
from dinoscale.losses.simmim import SimMIMLoss, patchify
from dinoscale.models.factory import build_backbone


def _as_uint8_chw(image: Any) -> torch.Tensor:
    """A PIL image, encoded bytes or a uint8 (C,H,W) / (H,W) tensor as a uint8 (3,H,W) tensor."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = load_rgb(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensor must be uint8 (C,H,W), got dtype {image.dtype}")
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must have shape (C,H,W) with C in (1, 3), got {tuple(image.shape)}")
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    raise TypeError(f"image must be a PIL image, a uint8 tensor or encoded bytes, got {type(image).__name__}")


class RandomResizedCropFlip:
    """One view: RandomResizedCrop (bicubic, antialiased) to ``size``, horizontal flip with p 0.5, normalisation.

    Returns a float32 ``(3, size, size)`` tensor. Randomness comes from torch's global RNG (the data loader
    seeds it per sample).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.67, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if size <= 0:
            raise ValueError(f"crop size must be positive, got {size}")
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"

    def __call__(self, image: Any) -> torch.Tensor:
        chw = _as_uint8_chw(image)
        top, left, h, w = sample_crop_boxes(chw.shape[1], chw.shape[2], 1, self.scale, self.ratio)[0].tolist()
        crop = chw[:, top : top + h, left : left + w].unsqueeze(0).float()
        if (h, w) != (self.size, self.size):
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True,
                                 align_corners=False).clamp_(0.0, 255.0)
        if torch.rand(()) < 0.5:
            crop = crop.flip(3)
        return (crop[0] / 255.0 - self.mean) / self.std


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


def collate_masked_views(
    samples: Sequence[tuple[torch.Tensor, Any]],
    *,
    rng: random.Random,
    grid: int,
    cell: int,
    mask_ratio: float,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """``(view, label)`` samples -> ``{"images": (B,3,S,S), "masks": bool (B, grid*grid), "labels": (B,)}``.

    The masks are drawn for the global batch of ``world_size`` ranks and this rank keeps its share (samples
    ``rank*B .. (rank+1)*B - 1``): ``rng`` is seeded by the step alone, so it is the same on every rank, and
    a step's masks do not depend on how the batch is split over ranks.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    shapes = {tuple(s[0].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"all views must have the same shape, got {sorted(shapes)}")
    labels = [int(label.item()) if isinstance(label, torch.Tensor) else int(label) for _, label in samples]
    batch = len(samples)
    masks = random_cell_masks(batch * world_size, grid, cell, mask_ratio, rng)[rank * batch : (rank + 1) * batch]
    return {
        "images": torch.stack([s[0] for s in samples]),
        "masks": masks,
        "labels": torch.tensor(labels, dtype=torch.long),
    }


class SimMIM(nn.Module):
    """``method: simmim``. Loss term: ``l1_masked``."""

    uses_teacher = False

    def __init__(self, cfg: DictConfig):
        super().__init__()
        c = cfg.simmim
        if cfg.crops.photometric_on_device:
            raise ValueError("simmim uses no colour augmentation: set crops.photometric_on_device=false")
        if not 0.0 < c.mask_ratio < 1.0:
            raise ValueError(f"simmim.mask_ratio must lie in (0, 1), got {c.mask_ratio}")
        self.cfg = cfg
        self.loss = SimMIMLoss(norm_target=c.norm_target)

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        # The backbone is built first after the loop's seed, so it is the network "random_init" rebuilds.
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        decoder = nn.Linear(backbone.embed_dim, backbone.patch_size**2 * 3)
        return nn.ModuleDict({"backbone": backbone, "decoder": decoder}), None

    def build_transform(self) -> RandomResizedCropFlip:
        return RandomResizedCropFlip(self.cfg.crops.global_crops_size, scale=tuple(self.cfg.simmim.crop_scale))

    def build_collate(self, patch_size: int):
        size = self.cfg.crops.global_crops_size
        mask_patch_size = self.cfg.simmim.mask_patch_size or patch_size
        if size % patch_size != 0 or mask_patch_size % patch_size != 0 or size % mask_patch_size != 0:
            raise ValueError(
                f"simmim needs crops.global_crops_size ({size}) to be a multiple of simmim.mask_patch_size "
                f"({mask_patch_size}), itself a multiple of the patch size ({patch_size})"
            )
        return partial(collate_masked_views, grid=size // patch_size, cell=mask_patch_size // patch_size,
                       mask_ratio=self.cfg.simmim.mask_ratio, rank=distributed.get_rank(),
                       world_size=distributed.get_world_size())

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns (loss, {"l1_masked": loss}); ``teacher`` and ``sched`` are not used."""
        images, masks = batch["images"], batch["masks"]
        out = student["backbone"](images, masks=masks, is_training=True)
        pred = student["decoder"](out["x_norm_patchtokens"])
        loss = self.loss(pred, patchify(images, student["backbone"].patch_size), masks)
        return loss, {"l1_masked": loss.detach()}
