"""DINOv2: DINO CLS loss + iBOT masked-patch loss + KoLeo, with an EMA teacher.

This file declares what the method needs (backbones, heads, losses) and computes the loss of one batch.
It knows nothing of sharding, optimizers or data loading; the train loop owns those.

Batch layout (from ``dinoscale.data.collate.collate_multicrop``), B images per rank:
  global_crops (2B,3,G,G) crop-major [crop A of all images, crop B of all images], local_crops (nL*B,3,L,L),
  masks (2B,N) bool, mask_indices (M,), masks_weight (M,), n_masked_patches (1,).
"""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from dinoscale import distributed
from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.data.collate import collate_multicrop
from dinoscale.data.transforms.masking import MaskingGenerator

from dinoscale.losses.dino import DINOLoss, dino_cls_loss
from dinoscale.losses.ibot import iBOTPatchLoss
from dinoscale.losses.koleo import KoLeoLoss
from dinoscale.models import vit
from dinoscale.models.heads import DINOHead

ARCHS = {
    "vit_small": vit.vit_small,
    "vit_base": vit.vit_base,
    "vit_large": vit.vit_large,
    "vit_giant2": vit.vit_giant2,
}


def build_backbone(model_cfg: DictConfig, *, drop_path_rate: float) -> vit.DinoVisionTransformer:
    """A plain ViT from the ``model:`` config section (width/depth/heads overridable for small runs)."""
    if model_cfg.arch not in ARCHS:
        raise ValueError(f"unknown model.arch '{model_cfg.arch}'; choose one of {sorted(ARCHS)}")
    overrides = {k: model_cfg[k] for k in ("embed_dim", "depth", "num_heads") if model_cfg[k] is not None}
    return ARCHS[model_cfg.arch](
        patch_size=model_cfg.patch_size,
        img_size=model_cfg.img_size,
        mlp_ratio=model_cfg.mlp_ratio,
        num_register_tokens=model_cfg.num_register_tokens,
        init_values=model_cfg.layerscale,
        ffn_layer=model_cfg.ffn_layer,
        qkv_bias=model_cfg.qkv_bias,
        proj_bias=model_cfg.proj_bias,
        ffn_bias=model_cfg.ffn_bias,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=model_cfg.drop_path_uniform,
        interpolate_antialias=model_cfg.interpolate_antialias,
        interpolate_offset=model_cfg.interpolate_offset,
        attn_backend=model_cfg.attn_backend,
        **overrides,
    )


def _head(section: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=section.head_n_prototypes,
        hidden_dim=section.head_hidden_dim,
        bottleneck_dim=section.head_bottleneck_dim,
        nlayers=section.head_nlayers,
    )


def build_networks(cfg: DictConfig, *, with_ibot: bool = True) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """Student and teacher: ModuleDicts with ``backbone``, ``dino_head`` and (optionally) ``ibot_head``.

    ``ibot_head`` exists when ``with_ibot`` and ``cfg.ibot.separate_head``.

    The teacher has the student's architecture with drop path 0; its weights are set from the student by
    the caller (``dinoscale.train.teacher.init_teacher_from_student_``).
    """
    nets = []
    for drop_path in (cfg.model.drop_path_rate, 0.0):
        backbone = build_backbone(cfg.model, drop_path_rate=drop_path)
        parts = {"backbone": backbone, "dino_head": _head(cfg.dino, backbone.embed_dim)}
        if with_ibot and cfg.ibot.separate_head:
            parts["ibot_head"] = _head(cfg.ibot, backbone.embed_dim)
        nets.append(nn.ModuleDict(parts))
    return nets[0], nets[1]


class DINOv2(nn.Module):
    """The DINOv2 method: networks, views and loss. Its loss centers are buffers, checkpointed with it.

    The interface every method in ``dinoscale/methods`` offers the train loop:
      ``build_networks() -> (student, teacher or None)``, ``build_transform()``, ``build_collate(patch_size)``,
      ``forward(student, teacher, batch, sched) -> (total loss, dict of detached terms)``.

    The class attributes ``use_ibot`` and ``use_koleo`` switch parts of the objective off; the ``dino`` and
    ``ibot`` methods are subclasses that do just that (``dinoscale/methods/dino.py``, ``ibot.py``).
    """

    uses_teacher = True
    use_ibot = True  # masked-patch loss (off: no masks, no iBOT head, loss or center)
    use_koleo = True  # KoLeo regulariser on the student's global [CLS] tokens

    def __init__(self, cfg: DictConfig):
        super().__init__()
        if cfg.dino.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"dino.centering must be 'centering' or 'sinkhorn_knopp', got '{cfg.dino.centering}'")
        if self.use_ibot and cfg.ibot.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"ibot.centering must be 'centering' or 'sinkhorn_knopp', got '{cfg.ibot.centering}'")
        self.cfg = cfg
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum)
        if self.use_ibot:
            ibot_dim = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
            self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.dino.student_temp, cfg.dino.center_momentum)
        if self.use_koleo:
            self.koleo_loss = KoLeoLoss(distributed=cfg.dino.koleo_distributed)

    def build_networks(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        student, teacher = build_networks(self.cfg, with_ibot=self.use_ibot)
        if not self.use_ibot:
            # Never masked, so never given a gradient: keep it out of the optimizer (whose checkpointed state
            # must cover every parameter it optimizes). It is still exported with the backbone.
            student["backbone"].mask_token.requires_grad_(False)
        return student, teacher

    def build_transform(self) -> MultiCropAugmentation:
        c = self.cfg.crops
        return MultiCropAugmentation(
            global_crops_scale=tuple(c.global_crops_scale),
            local_crops_scale=tuple(c.local_crops_scale),
            local_crops_number=c.local_crops_number,
            global_crops_size=c.global_crops_size,
            local_crops_size=c.local_crops_size,
            photometric_on_device=c.photometric_on_device,
        )

    def build_collate(self, patch_size: int):
        """Multi-crop collate with iBOT block masks on the global crops' patch grid (none without iBOT)."""
        grid = self.cfg.crops.global_crops_size // patch_size
        n_tokens = grid * grid
        return partial(
            collate_multicrop,
            mask_generator=MaskingGenerator((grid, grid), max_num_patches=int(0.5 * n_tokens)),
            n_tokens=n_tokens,
            mask_ratio_tuple=tuple(self.cfg.ibot.mask_ratio_min_max),
            mask_probability=self.cfg.ibot.mask_sample_probability if self.use_ibot else 0.0,
            local_crops_size=self.cfg.crops.local_crops_size,
            rank=distributed.get_rank(),  # masks are drawn for the global batch; this rank builds its share
            world_size=distributed.get_world_size(),
        )

    @torch.no_grad()
    def _teacher_targets(self, teacher: nn.ModuleDict, batch: dict, teacher_temp: float):
        """Teacher probabilities for the global-crop CLS tokens (crop order A, B) and the masked patches
        (None without iBOT)."""
        out = teacher["backbone"](batch["global_crops"], is_training=True)
        cls = out["x_norm_clstoken"]  # crop order A, B; dino_cls_loss pairs teacher A with student B and back
        if not self.use_ibot:
            cls_logits, patch_logits = teacher["dino_head"](cls), None
        elif "ibot_head" in teacher:
            patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            cls_logits = teacher["dino_head"](cls)
            patch_logits = teacher["ibot_head"](patches)
        else:  # shared head: one pass over CLS and masked patches together
            patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            logits = teacher["dino_head"](torch.cat((cls, patches)))
            cls_logits, patch_logits = logits[: cls.shape[0]], logits[cls.shape[0] :]
        cls_logits = cls_logits.float()

        if self.cfg.dino.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
        else:
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
        if patch_logits is None:
            return cls_probs, None
        patch_logits = patch_logits.float()
        if self.cfg.ibot.centering == "centering":
            patch_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.ibot_loss.update_center(patch_logits)
        else:
            patch_probs = self.ibot_loss.sinkhorn_knopp_teacher(
                patch_logits, teacher_temp, n_masked_patches_tensor=batch["n_masked_patches"].clone()
            )
        return cls_probs, patch_probs

    def forward(self, student: nn.ModuleDict, teacher: nn.ModuleDict, batch: dict, sched: dict):
        """Returns (total loss, dict of detached loss terms); ``sched`` holds this step's teacher_temp."""
        cls_probs, patch_probs = self._teacher_targets(teacher, batch, sched["teacher_temp"])

        has_local = batch["local_crops"].shape[0] > 0
        global_masks = batch["masks"] if self.use_ibot else None
        crops = [batch["global_crops"], batch["local_crops"]] if has_local else [batch["global_crops"]]
        masks = [global_masks, None] if has_local else [global_masks]
        outs = student["backbone"](crops, masks=masks, is_training=True)
        global_out = outs[0]
        global_cls = global_out["x_norm_clstoken"]
        local_cls = outs[1]["x_norm_clstoken"] if has_local else None

        # Student heads: CLS of all crops (and masked patches, when the head is shared) in one pass.
        n_global = global_cls.shape[0]
        cls_in = [global_cls] + ([local_cls] if has_local else [])
        patch_logits = None
        if not self.use_ibot:
            cls_logits = student["dino_head"](torch.cat(cls_in))
        elif "ibot_head" in student:
            masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            cls_logits = student["dino_head"](torch.cat(cls_in))
            patch_logits = student["ibot_head"](masked_patches)
        else:
            masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
            logits = student["dino_head"](torch.cat(cls_in + [masked_patches]))
            n_cls = n_global + (local_cls.shape[0] if has_local else 0)
            cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        cls_logits = cls_logits.float()

        global_term, local_term = dino_cls_loss(
            self.dino_loss,
            student_global=cls_logits[:n_global],
            student_local=cls_logits[n_global:] if has_local else None,
            teacher_probs=cls_probs,
        )
        terms = {"dino_global": global_term, "dino_local": local_term}
        total = self.cfg.dino.loss_weight * (global_term + local_term)
        if self.use_koleo:
            terms["koleo"] = sum(self.koleo_loss(p.float()) for p in global_cls.chunk(2))
            total = total + self.cfg.dino.koleo_loss_weight * terms["koleo"]
        if self.use_ibot:
            terms["ibot"] = self.ibot_loss.forward_masked(
                patch_logits.float(),
                patch_probs,
                student_masks_flat=batch["masks"],
                n_masked_patches=batch["n_masked_patches"],
                masks_weight=batch["masks_weight"],
            )
            total = total + self.cfg.ibot.loss_weight * terms["ibot"]
        return total, {k: v.detach() for k, v in terms.items()}
