"""BEiT (Bao et al. 2022): BERT-style masked image modelling: predict the visual tokens of the masked patches.

Tokenizer: a discrete VAE (``dinoscale.tokenizers.dvae``, trained beforehand by ``tools/train_tokenizer.py``) read
from ``beit.tokenizer``; only its encoder runs. It is frozen: no gradient, eval mode, not a parameter of the
method nor of the student (so never in the optimizer or its checkpointed state), handed to the loop by
:meth:`BEiT.frozen_networks`, which places it on the device in the compute dtype and shards it for inference only
(``parallel.parallelize_frozen``); it is reloaded from its file on every start, never checkpointed. Its tokens
of an image are the argmax of its logits, one per cell of ``dVAE patch_size`` pixels, row-major.

Views (``dinoscale.data.transforms.single_crop``): one RandomResizedCrop (``beit.crop_scale``, aspect ratio
3/4-4/3) with a horizontal flip, normalised, no colour augmentation (BEiT's released pretraining transform;
``crops.photometric_on_device`` must stay false). The ViT sees it at ``crops.global_crops_size``. The tokenizer
sees the uncorrupted crop: with ``beit.tokenizer_input_size`` set (BEiT: 112 px for 224-px crops, the dVAE
downsampling by 8) the same box and flip resized to that size; with null (the Fashion-MNIST recipe) the crop
itself, so the dVAE's patch size is the ViT's. Either way the tokenizer's grid must be the ViT's patch grid.

Masks (``dinoscale.data.collate.collate_block_masked_views``): BEiT's blockwise masking with
``dinoscale.data.transforms.masking.MaskingGenerator``: rectangles of at least ``beit.min_block_patches``
patches, aspect ratio in (``beit.min_aspect``, 1 / ``beit.min_aspect``), added until ``beit.num_masking_patches``
patches are masked (BEiT: 75 of 196, blocks of at least 16), or until ten proposals in a row add nothing.
BEiT's algorithm, with two differences of the shared generator: a block may span the whole height or width of
the grid (BEiT's stay strictly inside), and while the remaining budget allows it a block's rectangle covers at
least ``min_block_patches`` patches (BEiT's rounding of the sides may give smaller ones). Drawn in the collate
for the global batch, seeded per step and image.

Networks (no teacher): the ViT backbone, whose ``mask_token`` replaces the embeddings of the masked patches
(``masks=``), and a linear head from each final patch token (after the last norm) to the K token logits (BEiT's
``lm_head``, truncated-normal init, std 0.02). Loss (``dinoscale.losses.beit``): cross-entropy of the head's
logits at the masked positions against the tokens, the mean over the masked patches of the global batch.

Differences from BEiT's code: the ViT has absolute position embeddings instead of BEiT's shared relative
position bias; the dVAE is ours (trained on the run's data, see ``dinoscale.tokenizers.dvae``), not DALL-E's, and
sees the same normalisation as the ViT; the tokenizer copy of the crop is resized bicubically (BEiT: Lanczos).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from dinoscale import distributed
from dinoscale.data.collate import collate_block_masked_views
from dinoscale.data.transforms.masking import MaskingGenerator
from dinoscale.data.transforms.single_crop import RandomResizedCropFlip, RandomResizedCropFlipPair
from dinoscale.losses.beit import BEiTLoss
from dinoscale.models.factory import build_backbone
from dinoscale.tokenizers.dvae import DVAEEncoder, load_tokenizer

__all__ = ["BEiT", "load_frozen_tokenizer"]


def load_frozen_tokenizer(path: str | Path) -> DVAEEncoder:
    """The encoder of the dVAE saved at ``path``, frozen (no grad) and in eval mode, on the CPU. Building the dVAE
    draws initial weights before they are overwritten: torch's RNG is restored afterwards, so the student's
    initial weights do not depend on the tokenizer."""
    with torch.random.fork_rng(devices=[]):
        encoder = load_tokenizer(path).encoder
    return encoder.eval().requires_grad_(False)


class BEiT(nn.Module):
    """``method: beit``. Loss terms: ``ce_masked`` (the loss), ``token_acc`` (share of masked patches whose token
    is predicted right)."""

    uses_teacher = False

    def __init__(self, cfg: DictConfig):
        super().__init__()
        c = cfg.beit
        if cfg.crops.photometric_on_device:
            raise ValueError("beit uses no colour augmentation: set crops.photometric_on_device=false")
        if cfg.crops.multi_resolution.enabled:
            raise ValueError("beit's single crop has one size: crops.multi_resolution is for the multi-crop methods")
        if not c.tokenizer:
            raise ValueError("method beit needs a trained tokenizer: set beit.tokenizer to the directory "
                             "tools/train_tokenizer.py writes (e.g. python tools/train_tokenizer.py --config "
                             "configs/methods/beit_fmnist.yaml)")
        if c.num_masking_patches < 1 or c.min_block_patches < 1 or not 0.0 < c.min_aspect <= 1.0:
            raise ValueError(f"beit needs num_masking_patches >= 1, min_block_patches >= 1 and min_aspect in (0, 1], "
                             f"got {c.num_masking_patches}, {c.min_block_patches}, {c.min_aspect}")
        self.cfg = cfg
        self.loss = BEiTLoss()
        # A dict, not a submodule: the method holds no parameters and its state_dict stays its buffers (none).
        self._frozen = {"tokenizer": load_frozen_tokenizer(c.tokenizer)}

    @property
    def tokenizer(self) -> DVAEEncoder:
        return self._frozen["tokenizer"]

    def frozen_networks(self) -> dict[str, nn.Module]:
        """The frozen tokenizer, for the loop to place, cast and shard (``dinoscale.methods.base.frozen_networks``)."""
        return self._frozen

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        # The backbone is built first after the loop's seed, so it is the network "random_init" rebuilds.
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        head = nn.Linear(backbone.embed_dim, self.tokenizer.vocab_size)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return nn.ModuleDict({"backbone": backbone, "head": head}), None

    def build_transform(self) -> RandomResizedCropFlip:
        size, second = self.cfg.crops.global_crops_size, self.cfg.beit.tokenizer_input_size
        scale = tuple(self.cfg.beit.crop_scale)
        if second is None:
            return RandomResizedCropFlip(size, scale=scale)
        return RandomResizedCropFlipPair(size, second, scale=scale)

    def build_collate(self, patch_size: int):
        c, size = self.cfg.beit, self.cfg.crops.global_crops_size
        if size % patch_size:
            raise ValueError(f"beit needs crops.global_crops_size ({size}) to be a multiple of the patch size "
                             f"({patch_size})")
        grid = size // patch_size
        tokenizer_size = c.tokenizer_input_size or size
        t = self.tokenizer.patch_size
        if tokenizer_size % t or tokenizer_size // t != grid:
            raise ValueError(
                f"the tokenizer's token grid must be the ViT's {grid}x{grid} patch grid, but it cuts its "
                f"{tokenizer_size}-px input (beit.tokenizer_input_size, null: crops.global_crops_size) into cells of "
                f"{t} px: train it with tools/train_tokenizer.py --patch-size {tokenizer_size / grid:g} (a whole "
                "number is needed), or change beit.tokenizer_input_size"
            )
        if c.num_masking_patches >= grid * grid:
            raise ValueError(f"beit.num_masking_patches={c.num_masking_patches} must be below the {grid * grid} "
                             "patches of a crop")
        generator = MaskingGenerator((grid, grid), num_masking_patches=c.num_masking_patches,
                                     min_num_patches=c.min_block_patches, max_num_patches=c.max_block_patches,
                                     min_aspect=c.min_aspect)
        return partial(collate_block_masked_views, mask_generator=generator,
                       num_masking_patches=c.num_masking_patches, rank=distributed.get_rank(),
                       world_size=distributed.get_world_size())

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns ``(loss, {"ce_masked", "token_acc"})``; ``teacher`` and ``sched`` are not used."""
        images, masks, mask_indices = batch["images"], batch["masks"], batch["mask_indices"]
        source = batch.get("tokenizer_images", images)  # the uncorrupted crop (or its copy at the tokenizer's size)
        with torch.no_grad():
            dtype = next(self.tokenizer.parameters()).dtype  # the compute dtype the loop cast it to
            tokens = self.tokenizer(source.to(dtype)).argmax(dim=1).flatten(1)  # (B, N)
        if tokens.shape != masks.shape:
            raise ValueError(f"the tokenizer gives {tuple(tokens.shape)} tokens for masks of {tuple(masks.shape)}")
        out = student["backbone"](images, masks=masks, is_training=True)
        # Only the masked patches go through the head; mask_indices (from the collate) needs no device sync.
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        logits = student["head"](patches)
        n_total = batch["n_masked_global"] / distributed.get_world_size()
        return self.loss(logits, tokens.flatten().index_select(0, mask_indices), n_total)
