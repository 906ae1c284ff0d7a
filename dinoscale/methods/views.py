"""Views shared by the joint-embedding methods (SimCLR, Barlow Twins, MSN): multi-crop views without masks.

The crops come from DINOv2's multi-crop augmentation (``dinoscale.data.augment``): two global crops with the
asymmetric photometry of BYOL (blur on crop 1, rarely on crop 2, solarisation on crop 2 only; exactly what
Barlow Twins uses) and optionally local crops. They are collated crop-major by
``dinoscale.data.collate.collate_multicrop`` with no masks drawn, so ``global_crops.chunk(2)`` gives the two
views of the same images and ``crops.photometric_on_device`` works as for DINOv2.
"""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig

from dinoscale.data.augment import MultiCropAugmentation
from dinoscale.data.collate import collate_multicrop
from dinoscale.data.masking import MaskingGenerator

__all__ = ["multicrop_transform", "multicrop_collate"]


def multicrop_transform(crops: DictConfig, *, local_crops_number: int) -> MultiCropAugmentation:
    """Two global crops (``crops.global_crops_*``) and ``local_crops_number`` local crops (``crops.local_crops_*``)."""
    return MultiCropAugmentation(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        photometric_on_device=crops.photometric_on_device,
    )


def multicrop_collate(crops: DictConfig, patch_size: int):
    """``collate_multicrop`` without masks: batches hold ``global_crops`` (2B,3,G,G), ``local_crops``,
    ``labels`` (and empty mask entries, ignored by these methods)."""
    if crops.global_crops_size % patch_size != 0:
        raise ValueError(
            f"crops.global_crops_size={crops.global_crops_size} is not a multiple of the patch size {patch_size}"
        )
    grid = crops.global_crops_size // patch_size
    return partial(
        collate_multicrop,
        mask_generator=MaskingGenerator((grid, grid)),
        n_tokens=grid * grid,
        mask_probability=0.0,
    )
