"""MSN (Assran et al. 2022): masked anchor views matched to an unmasked target view over learnable prototypes.

Networks: the ViT backbone, a projector on its [CLS] token (``msn.proj_hidden_dim``, 3 linear layers with
global batch norm and GELU, output ``msn.proj_out_dim``) and ``msn.num_prototypes`` prototypes. The EMA
teacher (``teacher.momentum_teacher`` schedule) is a copy of all three; only its backbone and projector are used:
the targets are assigned with the student's current prototypes, as in MSN. (The teacher keeps a copy of the
prototypes so that student and teacher have the same parts, which EMA and sharding require.)
Views (the multi-crop augmentation): global crop 1 is the target view (teacher); global crop 2 (the "random"
view) and the ``crops.local_crops_number`` local ("focal") crops are the anchor views (student).
Patch dropping: a random ``msn.patch_drop`` fraction of every anchor's patches is *masked*: their embeddings
are replaced by the backbone's mask token (``masks=``) rather than removed from the sequence. The encoder
therefore still processes all tokens (no compute saving, unlike MSN's token dropping) but the information in the
dropped patches is gone just the same.
Loss: ``dinoscale.losses.msn``: cross-entropy to the sharpened target minus ``msn.me_max_weight`` times the
entropy of the mean anchor prediction over the global batch. The teacher temperature schedule is not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dinoscale.losses.msn import MSNLoss
from dinoscale.models.factory import build_backbone
from dinoscale.methods.views import multicrop_collate, multicrop_transform
from dinoscale.models.projector import ProjectionMLP


class Prototypes(nn.Module):
    """``K`` learnable prototypes; ``forward(z)`` gives the cosine similarities ``(..., K)`` (float32).

    Only their directions matter; they get the optimizer's weight decay like any other weight matrix (MSN
    excludes them; here the shared parameter groups decide, as for DINO's prototype layer).
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        if dim <= 0 or num_prototypes <= 0:
            raise ValueError(f"Prototypes needs positive sizes, got dim={dim}, num_prototypes={num_prototypes}")
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        bound = 1.0 / math.sqrt(dim)  # MSN's init; only the directions matter
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # float32: the targets divide these by 0.025, so bf16 rounding (~0.004) would move them visibly.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()


def random_patch_masks(n_images: int, n_patches: int, ratio: float, device: torch.device) -> torch.Tensor:
    """Bool ``(n_images, n_patches)``: ``round(ratio * n_patches)`` patches per image, uniformly at random.

    Uses torch's RNG on ``device`` (the loop checkpoints it, so resumed runs draw the same masks).
    """
    n_drop = round(ratio * n_patches)
    noise = torch.rand(n_images, n_patches, device=device)
    masks = torch.zeros(n_images, n_patches, dtype=torch.bool, device=device)
    if n_drop > 0:
        masks.scatter_(1, noise.topk(n_drop, dim=1).indices, True)
    return masks


class MSN(nn.Module):
    """``method: msn``. Loss terms: ``msn_ce`` (cross-entropy), ``mean_entropy`` (H of the mean prediction)."""

    uses_teacher = True

    def __init__(self, cfg: DictConfig):
        super().__init__()
        c = cfg.msn
        if not 0.0 <= c.patch_drop < 1.0:
            raise ValueError(f"msn.patch_drop must lie in [0, 1), got {c.patch_drop}")
        self.cfg = cfg
        self.loss = MSNLoss(temperature=c.temperature, target_temperature=c.target_temperature,
                            me_max_weight=c.me_max_weight)

    def build_networks(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """Student and teacher with ``backbone``, ``projector``, ``prototypes``; the teacher without drop path."""
        c = self.cfg.msn
        nets = []
        for drop_path in (self.cfg.model.drop_path_rate, 0.0):
            # The student's backbone is built first after the loop's seed: it is the network "random_init" rebuilds.
            backbone = build_backbone(self.cfg.model, drop_path_rate=drop_path)
            projector = ProjectionMLP(backbone.embed_dim, [c.proj_hidden_dim] * 2, c.proj_out_dim, activation="gelu")
            prototypes = Prototypes(c.proj_out_dim, c.num_prototypes)
            nets.append(nn.ModuleDict({"backbone": backbone, "projector": projector, "prototypes": prototypes}))
        return nets[0], nets[1]

    def build_transform(self):
        return multicrop_transform(self.cfg.crops, local_crops_number=self.cfg.crops.local_crops_number)

    def build_collate(self, patch_size: int):
        return multicrop_collate(self.cfg.crops, patch_size)

    def forward(self, student: nn.ModuleDict, teacher: nn.ModuleDict, batch: dict, sched: dict):
        """Returns (loss, {"msn_ce", "mean_entropy"}); the EMA update of ``teacher`` is the loop's."""
        target_view, anchor_view = batch["global_crops"].chunk(2)
        with torch.no_grad():
            target_cls = teacher["backbone"](target_view, is_training=True)["x_norm_clstoken"]
            target_sims = student["prototypes"](teacher["projector"](target_cls))

        patch_size = student["backbone"].patch_size
        crops = [anchor_view] + ([batch["local_crops"]] if batch["local_crops"].shape[0] > 0 else [])
        masks = [
            random_patch_masks(c.shape[0], (c.shape[-2] // patch_size) * (c.shape[-1] // patch_size),
                               self.cfg.msn.patch_drop, c.device)
            for c in crops
        ]
        outs = student["backbone"](crops, masks=masks, is_training=True)
        # All anchor views through the projector at once (view-major rows, as the loss expects).
        anchor_cls = torch.cat([o["x_norm_clstoken"] for o in outs])
        anchor_sims = student["prototypes"](student["projector"](anchor_cls))
        loss, parts = self.loss(anchor_sims, target_sims)
        return loss, {"msn_ce": parts["ce"], "mean_entropy": parts["entropy"]}
