"""Views shared by the joint-embedding methods (SimCLR, Barlow Twins, MSN): multi-crop views without masks,
and ``TwoViewMethod``, the whole step of the methods that compare two views' projected [CLS] tokens.

The crops come from DINOv2's multi-crop augmentation (``dinoscale.data.augment``): two global crops with the
asymmetric photometry of BYOL (blur on crop 1, rarely on crop 2, solarisation on crop 2 only; exactly what
Barlow Twins uses) and optionally local crops. They are collated crop-major by
``dinoscale.data.collate.collate_multicrop`` with no masks drawn, so ``global_crops.chunk(2)`` gives the two
views of the same images and ``crops.photometric_on_device`` works as for DINOv2.
"""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig
from torch import nn

from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.data.collate import collate_multicrop
from dinoscale.data.transforms.masking import MaskingGenerator
from dinoscale.methods.dinov2 import build_backbone

__all__ = ["TwoViewMethod", "multicrop_transform", "multicrop_collate"]


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


class TwoViewMethod(nn.Module):
    """A method without teacher that projects the [CLS] tokens of the two global crops and compares them.

    Subclasses set ``self.cfg``, ``self.loss`` (a module taking the two views' projections ``(z_a, z_b)``)
    and ``loss_name`` (the logged term), and build the projector in :meth:`build_projector`.
    """

    uses_teacher = False
    loss_name: str

    def build_projector(self, embed_dim: int) -> nn.Module:
        raise NotImplementedError

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        # The backbone is built first after the loop's seed, so it is the network "random_init" rebuilds.
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        # No masking in these objectives: the mask token never gets a gradient, so it stays out of the
        # optimizer (whose checkpointed state must cover every parameter it optimizes). It is still exported.
        backbone.mask_token.requires_grad_(False)
        return nn.ModuleDict({"backbone": backbone, "projector": self.build_projector(backbone.embed_dim)}), None

    def build_transform(self):
        return multicrop_transform(self.cfg.crops, local_crops_number=0)

    def build_collate(self, patch_size: int):
        return multicrop_collate(self.cfg.crops, patch_size)

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns (loss, {loss_name: loss}); ``teacher`` and ``sched`` are not used."""
        cls = student["backbone"](batch["global_crops"], is_training=True)["x_norm_clstoken"]
        # One forward for both views (crop-major: view A of all images, then view B), so batch-norm
        # statistics in the projector cover both views.
        z_a, z_b = student["projector"](cls).chunk(2)
        loss = self.loss(z_a, z_b)
        return loss, {self.loss_name: loss.detach()}
