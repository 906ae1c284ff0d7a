"""SimMIM (Xie et al. 2022): predict the raw pixels of randomly masked patches with a linear decoder.

Networks: the ViT backbone, whose ``mask_token`` replaces the masked patch embeddings (``masks=``), and a
linear decoder from each output patch token to its ``patch_size^2 * 3`` pixels (SimMIM's one-layer head). No
teacher.
Views (``dinoscale.data.transforms.single_crop``): one crop per image, RandomResizedCrop (``simmim.crop_scale``,
aspect ratio 3/4-4/3) to ``crops.global_crops_size`` with a horizontal flip and mean/std normalisation; no colour
augmentation, so ``crops.photometric_on_device`` must stay false.
Masks (``dinoscale.data.collate.collate_masked_views``): drawn in the collate for the global batch (seeded per step,
like DINOv2's): ``simmim.mask_ratio`` of the cells of a grid of ``simmim.mask_patch_size`` pixels, each cell
covering ``(mask_patch_size / patch_size)^2`` patches.
Loss: L1 on the masked patches only (``dinoscale.losses.simmim``), targets optionally standardised per patch
(``simmim.norm_target``).
"""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig
from torch import nn

from dinoscale import distributed
from dinoscale.data.collate import collate_masked_views
from dinoscale.data.transforms.single_crop import RandomResizedCropFlip
from dinoscale.losses.simmim import SimMIMLoss, patchify
from dinoscale.models.factory import build_backbone


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
        if self.cfg.crops.multi_resolution.enabled:
            raise ValueError("simmim's single crop has one size: crops.multi_resolution is for the multi-crop methods")
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
