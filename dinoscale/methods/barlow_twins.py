"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity.

Networks: the ViT backbone and a projector on its [CLS] token (``barlow_twins.proj_dims``, e.g. the paper's
8192-8192-8192: bias-free linear layers with global batch norm and ReLU between them). No teacher.
Views: the two global crops of the multi-crop augmentation, whose asymmetric blur/solarisation is the BYOL
augmentation the paper uses (``crops.global_crops_*``; local crops are not used).
Loss: ``dinoscale.losses.barlow_twins`` with ``barlow_twins.lambda_offdiag``, statistics over the global batch.
Both views go through the networks as one batch (one forward per step), so the projector's batch-norm
statistics cover both views; the reference code runs the views one after the other, each with its own.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from dinoscale.losses.barlow_twins import BarlowTwinsLoss
from dinoscale.methods.dinov2 import build_backbone
from dinoscale.methods.views import multicrop_collate, multicrop_transform
from dinoscale.models.projector import ProjectionMLP


class BarlowTwins(nn.Module):
    """``method: barlow_twins``. Loss term: ``barlow_twins``."""

    uses_teacher = False

    def __init__(self, cfg: DictConfig):
        super().__init__()
        if len(cfg.barlow_twins.proj_dims) < 1:
            raise ValueError("barlow_twins.proj_dims must list at least the output size, e.g. [8192, 8192, 8192]")
        self.cfg = cfg
        self.loss = BarlowTwinsLoss(lambda_offdiag=cfg.barlow_twins.lambda_offdiag)

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        # The backbone is built first after the loop's seed, so it is the network "random_init" rebuilds.
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        # No masking in this objective: the mask token never gets a gradient, so it stays out of the optimizer
        # (whose checkpointed state must cover every parameter it optimizes). It is still exported.
        backbone.mask_token.requires_grad_(False)
        dims = list(self.cfg.barlow_twins.proj_dims)
        projector = ProjectionMLP(backbone.embed_dim, dims[:-1], dims[-1], bias=False)
        return nn.ModuleDict({"backbone": backbone, "projector": projector}), None

    def build_transform(self):
        return multicrop_transform(self.cfg.crops, local_crops_number=0)

    def build_collate(self, patch_size: int):
        return multicrop_collate(self.cfg.crops, patch_size)

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns (loss, {"barlow_twins": loss}); ``teacher`` and ``sched`` are not used."""
        cls = student["backbone"](batch["global_crops"], is_training=True)["x_norm_clstoken"]
        z_a, z_b = student["projector"](cls).chunk(2)  # crop-major: view A of all images, then view B
        loss = self.loss(z_a, z_b)
        return loss, {"barlow_twins": loss.detach()}
