"""Collates: a rank's transformed samples -> one batch, with the masks drawn for the global batch.

Every collate takes ``rng`` seeded by the step alone (the same on every rank, see
:func:`dinoscale.data.steps.collate_step`), draws the masks of the GLOBAL batch and keeps this rank's
share, so a step's masks do not depend on how the batch is split over ranks.

:func:`collate_masked_views` (SimMIM: one view, cell masks) and :func:`collate_block_masked_views` (BEiT: one
view or a view pair, block masks) are single-view collates.

:func:`collate_multicrop` (DINOv2/iBOT multi-crop samples, block masks):

Crops are stacked crop-major (all samples' crop 0, then all samples' crop 1, ...), so that
``global_crops.chunk(2)`` gives the two views of the same B images in the same order.

Masks follow DINOv2: of the 2B global images, ``int(2B * mask_probability)`` are masked, the
i-th of them with a ratio drawn uniformly in the i-th of equal bins of ``mask_ratio_tuple``
(so ratios are spread over the range within every batch), the rest get an empty mask, and the
order is shuffled. ``masks_weight`` gives each masked patch the weight ``1 / n_i`` where ``n_i``
is the number of masked patches of its image, so every masked image counts equally in the
masked-token loss: ``L = sum_i (1/n_i) sum_{p in mask_i} l(i, p)``.

Note for data loaders: ``rng`` is copied into each worker process, so pass a per-worker (or per
batch) seeded ``random.Random`` or all workers will draw the same masks.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import default_collate

from dinoscale.data.transforms.masking import MaskingGenerator, random_cell_masks


def _stack_crop_major(samples: Sequence[Tuple[Dict[str, Any], Any]], key: str) -> torch.Tensor:
    counts = {len(s[0][key]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"all samples must have the same number of {key}, got counts {sorted(counts)}")
    n_crops = counts.pop()
    crops = [s[0][key][i] for i in range(n_crops) for s in samples]
    if n_crops == 0:
        return torch.empty(0)
    shapes = {tuple(c.shape) for c in crops}
    if len(shapes) != 1:
        raise ValueError(f"all {key} must have the same shape, got {sorted(shapes)}")
    # default_collate stacks straight into shared memory inside a DataLoader worker, saving the
    # copy that sending the batch to the main process would otherwise make.
    return default_collate(crops)


def _label(label: Any, index: int) -> int:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise ValueError(f"label of sample {index} must be a scalar, got shape {tuple(label.shape)}")
        label = label.item()
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"label of sample {index} must be an int (-1 when unknown), got {label!r}")
    return int(label)


def collate_multicrop(
    samples: Sequence[Tuple[Dict[str, Any], Any]],
    *,
    mask_generator: MaskingGenerator,
    n_tokens: int,
    mask_ratio_tuple: Tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    rng: random.Random,
    local_crops_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Dict[str, Any]:
    """Collate ``(crops_dict, label)`` samples from :class:`MultiCropAugmentation`.

    Returns a dict with ``global_crops`` (2B,3,G,G), ``local_crops`` (nL*B,3,L,L),
    ``masks`` (2B, n_tokens) bool, ``mask_indices`` (M,) long (flat indices into
    ``masks.flatten()``), ``masks_weight`` (M,) float, ``n_masked_patches`` (1,) long = M,
    ``upperbound`` (int, >= M, for fixed-size buffers) and ``labels`` (B,) long; samples with
    ``gram_crops`` (the global crops at the Gram teacher's size) add ``gram_crops`` (2B,3,S,S), crop-major
    like ``global_crops``. Crop dtypes are
    kept (uint8 when the photometric part runs on the device). With no local crops,
    ``local_crops`` is (0,3,L,L) when ``local_crops_size`` is given, else (0,3,0,0).

    Masks are drawn for the GLOBAL batch (``world_size`` ranks of B samples each, rank r holding global
    samples r*B .. (r+1)*B-1) and each rank builds only its own images' masks: ``rng`` must be the same
    on every rank (seeded by the step). Of the 2*B*world_size global crops, exactly
    ``int(2*B*world_size * mask_probability)`` are masked, with ratios spread over ``mask_ratio_tuple``
    as DINOv2 does; each image's block mask comes from its own seed. So a step's masks do not depend on
    how the global batch is split over ranks, and an N-rank run sees the masks of a 1-rank run.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random instance, got {type(rng).__name__}")
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    if n_tokens != mask_generator.num_patches:
        raise ValueError(
            f"n_tokens ({n_tokens}) must equal the mask generator's grid size "
            f"{mask_generator.get_shape()} = {mask_generator.num_patches} patches"
        )
    lo, hi = mask_ratio_tuple
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"mask_ratio_tuple must satisfy 0 <= min <= max <= 1, got {mask_ratio_tuple}")
    if not (0.0 <= mask_probability <= 1.0):
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    for i, s in enumerate(samples):
        if not (isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], dict)):
            raise TypeError(f"sample {i} must be a (crops_dict, label) pair, got {type(s).__name__}")
        for key in ("global_crops", "local_crops"):
            if key not in s[0]:
                raise KeyError(f"sample {i} has no {key!r} (keys: {sorted(s[0])})")

    batch_size = len(samples)
    global_crops = _stack_crop_major(samples, "global_crops")
    if global_crops.shape[0] != 2 * batch_size:
        raise ValueError(f"expected 2 global crops per sample, got {global_crops.shape[0] // batch_size}")
    local_crops = _stack_crop_major(samples, "local_crops")
    if local_crops.numel() == 0 and local_crops.dim() == 1:
        # No local crops: still a 4-d tensor with the crops' dtype, so callers can concatenate.
        size = local_crops_size or 0
        local_crops = torch.empty(0, global_crops.shape[1], size, size, dtype=global_crops.dtype)
    labels = torch.tensor([_label(s[1], i) for i, s in enumerate(samples)], dtype=torch.long)
    with_gram = {"gram_crops" in s[0] for s in samples}
    if len(with_gram) != 1:
        raise ValueError("some samples have gram_crops and some do not")
    gram_crops = _stack_crop_major(samples, "gram_crops") if with_gram.pop() else None
    if gram_crops is not None and gram_crops.shape[0] != 2 * batch_size:
        raise ValueError(f"expected 2 gram crops per sample, got {gram_crops.shape[0] // batch_size}")

    n_images = global_crops.shape[0]  # 2B on this rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    global_batch = batch_size * world_size
    n_global_images = 2 * global_batch
    n_masked_images = int(n_global_images * mask_probability)
    bins = np.linspace(lo, hi, n_masked_images + 1)
    # One (ratio, bin) per masked global image, then a shuffle assigns them to global crop slots.
    assignment: List[Optional[int]] = list(range(n_masked_images)) + [None] * (n_global_images - n_masked_images)
    ratios = [rng.uniform(bins[i], bins[i + 1]) for i in range(n_masked_images)]
    rng.shuffle(assignment)
    image_seed = rng.getrandbits(63)
    masks: List[np.ndarray] = []
    upperbound = 0
    empty = np.zeros(mask_generator.get_shape(), dtype=bool)
    for crop in range(2):  # crop-major: this rank's crop-0 images, then its crop-1 images
        for j in range(rank * batch_size, (rank + 1) * batch_size):
            g = crop * global_batch + j
            b = assignment[g]
            if b is None:
                masks.append(empty)
                continue
            masks.append(mask_generator(int(n_tokens * ratios[b]), random.Random(f"{image_seed}:{g}")))
            upperbound += int(n_tokens * bins[b + 1])

    mask_tensor = torch.from_numpy(np.stack(masks).reshape(n_images, n_tokens))
    mask_indices = mask_tensor.flatten().nonzero().squeeze(1)
    per_image = mask_tensor.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_image).expand_as(mask_tensor)[mask_tensor]
    batch = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": mask_tensor,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "upperbound": upperbound,
        "labels": labels,
    }
    if gram_crops is not None:
        batch["gram_crops"] = gram_crops
    return batch


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


def collate_block_masked_views(
    samples: Sequence[tuple[Any, Any]],
    *,
    rng: random.Random,
    mask_generator: MaskingGenerator,
    num_masking_patches: int,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """BEiT's batches: ``(view, label)`` or ``((view, tokenizer_view), label)`` samples -> ``images`` (B,3,S,S),
    ``tokenizer_images`` (B,3,S2,S2) for pairs, ``masks`` bool (B, N), ``mask_indices`` (M,) long (flat indices
    into ``masks.flatten()``, row-major), ``n_masked_global`` (0-d long: the masked patches of the GLOBAL batch) and
    ``labels`` (B,).

    Each image's block mask asks ``mask_generator`` for ``num_masking_patches`` patches (it may give fewer when
    its blocks stop fitting), seeded by the step's ``rng`` and the image's index in the global batch of
    ``world_size`` ranks (rank r holds samples r*B .. (r+1)*B - 1): a step's masks, and their global count, do
    not depend on how the batch is split over ranks. ``n_masked_global`` is computed from every rank's masks
    (drawn here on each rank, not communicated).
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random instance, got {type(rng).__name__}")
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    pairs = {isinstance(s[0], (tuple, list)) for s in samples}
    if len(pairs) != 1:
        raise ValueError("some samples are view pairs and some single views")
    paired = pairs.pop()
    views = [s[0][0] if paired else s[0] for s in samples]
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1:
        raise ValueError(f"all views must have the same shape, got {sorted(shapes)}")
    batch_size = len(samples)
    image_seed = rng.getrandbits(63)
    global_masks = np.stack([mask_generator(num_masking_patches, random.Random(f"{image_seed}:{g}"))
                             for g in range(batch_size * world_size)]).reshape(batch_size * world_size, -1)
    masks = torch.from_numpy(global_masks[rank * batch_size : (rank + 1) * batch_size].copy())
    batch = {
        "images": torch.stack(views),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().squeeze(1),
        "n_masked_global": torch.tensor(int(global_masks.sum()), dtype=torch.long),
        "labels": torch.tensor([_label(s[1], i) for i, s in enumerate(samples)], dtype=torch.long),
    }
    if paired:
        batch["tokenizer_images"] = torch.stack([s[0][1] for s in samples])
    return batch
