"""Self-supervised losses. One loss per module; each is a small ``nn.Module``."""

from dinoscale.losses.dino import DINOLoss, dino_cls_loss, sinkhorn_knopp, soft_cross_entropy
from dinoscale.losses.ibot import iBOTPatchLoss
from dinoscale.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "dino_cls_loss", "sinkhorn_knopp", "soft_cross_entropy", "iBOTPatchLoss", "KoLeoLoss"]
