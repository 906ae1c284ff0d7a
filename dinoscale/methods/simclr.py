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
from dinoscale.methods.two_view import TwoViewMethod
from dinoscale.models.projector import ProjectionMLP


class SimCLR(TwoViewMethod):
    """``method: simclr``. Loss term: ``nt_xent``."""

    loss_name = "nt_xent"

    def __init__(self, cfg: DictConfig):
        super().__init__()
        if cfg.simclr.proj_nlayers < 1:
            raise ValueError(f"simclr.proj_nlayers must be >= 1, got {cfg.simclr.proj_nlayers}")
        self.cfg = cfg
        self.loss = NTXentLoss(temperature=cfg.simclr.temperature)

    def build_projector(self, embed_dim: int) -> nn.Module:
        c = self.cfg.simclr
        return ProjectionMLP(embed_dim, [c.proj_hidden_dim] * (c.proj_nlayers - 1), c.proj_out_dim, last_norm=True)
