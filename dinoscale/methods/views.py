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
from dinoscale.data.transforms.multicrop import CropResolutions, MultiCropAugmentation

__all__ = ["crop_resolutions", "multicrop_collate", "multicrop_transform"]


def crop_resolutions(crops: DictConfig) -> CropResolutions | None:
    """``crops.multi_resolution`` as :class:`CropResolutions` (its ``gram_crops_sizes`` default to
    ``crops.gram_crops_size`` for every entry); None when it is off."""
    m = crops.multi_resolution
    if not m.enabled:
        return None
    gram = list(m.gram_crops_sizes) or [crops.gram_crops_size] * len(m.global_crops_sizes)
    return CropResolutions(global_sizes=tuple(m.global_crops_sizes), local_sizes=tuple(m.local_crops_sizes),
                           gram_sizes=tuple(gram), weights=tuple(float(w) for w in m.weights))


def multicrop_transform(crops: DictConfig, *, local_crops_number: int, gram: bool = False) -> MultiCropAugmentation:
    """Two global crops (``crops.global_crops_*``) and ``local_crops_number`` local crops (``crops.local_crops_*``);
    with ``gram`` (a method with ``gram.enabled``) the Gram crops of ``crops.gram_crops_size``, and the per-step
    sizes of ``crops.multi_resolution``."""
    resolutions = crop_resolutions(crops)
    gram_sizes = [crops.gram_crops_size] + ([] if resolutions is None else list(resolutions.gram_sizes))
    if not gram and any(g is not None for g in gram_sizes):
        raise ValueError("crops.gram_crops_size (and crops.multi_resolution.gram_crops_sizes) are the Gram "
                         "teacher's crops: set gram.enabled (a DINOv2-family method), or leave them null/empty")
    return MultiCropAugmentation(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        photometric_on_device=crops.photometric_on_device,
        photometry_backend=crops.photometry_backend,
        gram_crops_size=crops.gram_crops_size,
        resolutions=resolutions,
    )


def _block_masked_collate(global_size: int, patch_size: int, *, local_crops_size: int | None, **options):
    """``collate_multicrop`` for global crops of ``global_size`` px: iBOT block masks on their patch grid."""
    if global_size % patch_size != 0:
        raise ValueError(f"the global crop size {global_size} is not a multiple of the patch size {patch_size}")
    grid = global_size // patch_size
    n_tokens = grid * grid
    return partial(
        collate_multicrop,
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=int(0.5 * n_tokens)),
        n_tokens=n_tokens,
        local_crops_size=local_crops_size,
        **options,
    )


def _collate_at_samples_size(samples, *, rng, patch_size: int, **options):
    """``_block_masked_collate`` at the global crop size of ``samples`` (a multi-resolution step: one size for
    all of them; ``collate_multicrop`` refuses mixed sizes)."""
    size = samples[0][0]["global_crops"][0].shape[-1]
    return _block_masked_collate(size, patch_size, local_crops_size=None, **options)(samples, rng=rng)


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
    ``n_masked_patches``, ``upperbound``, ``labels`` and, with Gram crops, ``gram_crops`` (2B,3,S,S). With
    ``crops.multi_resolution`` the mask grid is that of each step's global crop size.
    """
    options = dict(
        mask_ratio_tuple=tuple(mask_ratio_min_max),
        mask_probability=mask_probability,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
    )
    resolutions = crop_resolutions(crops)
    if resolutions is None:
        return _block_masked_collate(crops.global_crops_size, patch_size, local_crops_size=crops.local_crops_size,
                                     **options)
    for size in resolutions.global_sizes:  # refused now rather than at the first step that draws it
        _block_masked_collate(size, patch_size, local_crops_size=None, **options)
    return partial(_collate_at_samples_size, patch_size=patch_size, **options)
