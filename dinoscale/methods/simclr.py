"""SimCLR (Chen et al. 2020): contrast two augmented views of each image against all other images.

Networks: the ViT backbone and a projection MLP on its [CLS] token (``simclr.proj_nlayers`` linear layers of
width ``simclr.proj_hidden_dim`` with global batch norm and ReLU, ending in ``simclr.proj_out_dim`` and a batch
norm, as SimCLR v2's 2048-2048-128 head). No teacher.
Views: the two global crops of the multi-crop augmentation (``crops.global_crops_*``; local crops are not used).
Loss: NT-Xent at ``simclr.temperature`` with negatives gathered from every rank (``dinoscale.losses.nt_xent``).
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from dinoscale.losses.nt_xent import NTXentLoss
from dinoscale.methods.dinov2 import build_backbone
from dinoscale.methods.views import multicrop_collate, multicrop_transform
from dinoscale.models.projector import ProjectionMLP


class SimCLR(nn.Module):
    """``method: simclr``. Loss term: ``nt_xent``."""

    uses_teacher = False

    def __init__(self, cfg: DictConfig):
        super().__init__()
        if cfg.simclr.proj_nlayers < 1:
            raise ValueError(f"simclr.proj_nlayers must be >= 1, got {cfg.simclr.proj_nlayers}")
        self.cfg = cfg
        self.loss = NTXentLoss(temperature=cfg.simclr.temperature)

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        # The backbone is built first after the loop's seed, so it is the network "random_init" rebuilds.
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        # No masking in this objective: the mask token never gets a gradient, so it stays out of the optimizer
        # (whose checkpointed state must cover every parameter it optimizes). It is still exported.
        backbone.mask_token.requires_grad_(False)
        c = self.cfg.simclr
        projector = ProjectionMLP(
            backbone.embed_dim, [c.proj_hidden_dim] * (c.proj_nlayers - 1), c.proj_out_dim, last_norm=True
        )
        return nn.ModuleDict({"backbone": backbone, "projector": projector}), None

    def build_transform(self):
        return multicrop_transform(self.cfg.crops, local_crops_number=0)

    def build_collate(self, patch_size: int):
        return multicrop_collate(self.cfg.crops, patch_size)

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns (loss, {"nt_xent": loss}); ``teacher`` and ``sched`` are not used."""
        cls = student["backbone"](batch["global_crops"], is_training=True)["x_norm_clstoken"]
        z_a, z_b = student["projector"](cls).chunk(2)  # crop-major: view A of all images, then view B
        loss = self.loss(z_a, z_b)
        return loss, {"nt_xent": loss.detach()}
