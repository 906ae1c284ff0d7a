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
from dinoscale.methods.two_view import TwoViewMethod
from dinoscale.models.projector import ProjectionMLP


class BarlowTwins(TwoViewMethod):
    """``method: barlow_twins``. Loss term: ``barlow_twins``."""

    loss_name = "barlow_twins"

    def __init__(self, cfg: DictConfig):
        super().__init__()
        if len(cfg.barlow_twins.proj_dims) < 1:
            raise ValueError("barlow_twins.proj_dims must list at least the output size, e.g. [8192, 8192, 8192]")
        self.cfg = cfg
        self.loss = BarlowTwinsLoss(lambda_offdiag=cfg.barlow_twins.lambda_offdiag)

    def build_projector(self, embed_dim: int) -> nn.Module:
        dims = list(self.cfg.barlow_twins.proj_dims)
        return ProjectionMLP(embed_dim, dims[:-1], dims[-1], bias=False)
