"""The multi-crop views of DINOv2, DINO, iBOT, SimCLR, Barlow Twins and MSN: their transform and collate.

The crops come from DINOv2's multi-crop augmentation (``dinoscale.data.transforms.multicrop``): two global crops with the
asymmetric photometry of BYOL (blur on crop 1, rarely on crop 2, solarisation on crop 2 only; exactly what
Barlow Twins uses) and ``local_crops_number`` local crops. They are collated crop-major by
``dinoscale.data.collate.collate_multicrop``, so ``global_crops.chunk(2)`` gives the two views of the same
images, and ``crops.photometric_on_device`` works the same for every method. Only iBOT's masked-patch loss
draws masks; the other methods' batches hold empty ones.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

from omegaconf import DictConfig

from dinoscale import distributed
from dinoscale.data.collate import collate_multicrop
from dinoscale.data.transforms.masking import MaskingGenerator
from dinoscale.data.transforms.multicrop import MultiCropAugmentation

__all__ = ["multicrop_collate", "multicrop_transform"]


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


def multicrop_collate(
    crops: DictConfig,
    patch_size: int,
    *,
    mask_probability: float = 0.0,
    mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
):
    """``collate_multicrop`` with iBOT block masks on the global crops' patch grid.

    ``mask_probability`` of the global crops get a mask covering a ratio in ``mask_ratio_min_max`` of their
    patches (0: no masks). Masks are drawn for the global batch; this rank builds its share. Batches hold
    ``global_crops`` (2B,3,G,G), ``local_crops`` (nL*B,3,L,L), ``masks``, ``mask_indices``, ``masks_weight``,
    ``n_masked_patches``, ``upperbound`` and ``labels``.
    """
    if crops.global_crops_size % patch_size != 0:
        raise ValueError(
            f"crops.global_crops_size={crops.global_crops_size} is not a multiple of the patch size {patch_size}"
        )
    grid = crops.global_crops_size // patch_size
    n_tokens = grid * grid
    return partial(
        collate_multicrop,
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=int(0.5 * n_tokens)),
        n_tokens=n_tokens,
        mask_ratio_tuple=tuple(mask_ratio_min_max),
        mask_probability=mask_probability,
        local_crops_size=crops.local_crops_size,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
    )
