"""DINOv2: DINO CLS loss + iBOT masked-patch loss + KoLeo, with an EMA teacher.

This file declares what the method needs (backbones, heads, losses) and computes the loss of one batch.
It knows nothing of sharding, optimizers or data loading; the train loop owns those. ``DINOv2`` keeps the
``Method`` contract of ``dinoscale.methods.base``; ``dino.py`` and ``ibot.py`` switch parts of it off.

Batch layout (from ``dinoscale.data.collate.collate_multicrop``), B images per rank:
  global_crops (2B,3,G,G) crop-major [crop A of all images, crop B of all images], local_crops (nL*B,3,L,L),
  masks (2B,N) bool, mask_indices (M,), masks_weight (M,), n_masked_patches (1,).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.methods.gram import GramAnchor
from dinoscale.methods.views import multicrop_collate, multicrop_transform

from dinoscale.losses.center import CenteredPrototypeLoss
from dinoscale.losses.dino import DINOLoss, dino_cls_loss
from dinoscale.losses.ibot import iBOTPatchLoss
from dinoscale.losses.koleo import KoLeoLoss
from dinoscale.models.factory import build_backbone
from dinoscale.models.heads import DINOHead

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


def masked_patch_tokens(backbone_out: dict, mask_indices: torch.Tensor) -> torch.Tensor:
    """The ``(M, D)`` output patch tokens at the masked positions (``mask_indices`` into the flat ``(2B*N)``)."""
    return backbone_out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]


def head_logits(
    net: nn.ModuleDict, cls_tokens: torch.Tensor, masked_patches: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prototype logits of the [CLS] tokens (``dino_head``) and of the masked patch tokens (``ibot_head``, or
    ``dino_head`` when iBOT shares it: then one pass over both). ``(cls_logits, patch_logits or None)``."""
    if masked_patches is None:
        return net["dino_head"](cls_tokens), None
    if "ibot_head" in net:
        return net["dino_head"](cls_tokens), net["ibot_head"](masked_patches)
    logits = net["dino_head"](torch.cat((cls_tokens, masked_patches)))
    return logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :]


@torch.no_grad()
def teacher_probs(
    loss: CenteredPrototypeLoss, logits: torch.Tensor, centering: str, teacher_temp: float, **sinkhorn_args
) -> torch.Tensor:
    """Targets from the teacher's logits: centered softmax, then the center's EMA update (``centering``), or
    Sinkhorn-Knopp (``sinkhorn_knopp``, with the loss's extra ``sinkhorn_args``)."""
    if centering == "centering":
        probs = loss.softmax_center_teacher(logits, teacher_temp)
        loss.update_center(logits)
        return probs
    return loss.sinkhorn_knopp_teacher(logits, teacher_temp, **sinkhorn_args)


@torch.no_grad()
def head_targets(
    teacher: nn.ModuleDict, batch: dict, cfg: DictConfig, dino_loss: CenteredPrototypeLoss,
    ibot_loss: CenteredPrototypeLoss | None, teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A teacher's targets on the global crops (its backbone and heads; the EMA teacher here, a frozen one in
    distillation): probabilities for the CLS tokens (crop order A, B) and, with ``ibot_loss``, for the patches at
    the mask positions; centred or Sinkhorn-Knopp as ``cfg.dino`` / ``cfg.ibot`` say."""
    out = teacher["backbone"](batch["global_crops"], is_training=True)
    # crop order A, B; dino_cls_loss pairs teacher A with student B and back
    patches = masked_patch_tokens(out, batch["mask_indices"]) if ibot_loss is not None else None
    cls_logits, patch_logits = head_logits(teacher, out["x_norm_clstoken"], patches)
    cls_probs = teacher_probs(dino_loss, cls_logits.float(), cfg.dino.centering, teacher_temp)
    if patch_logits is None:
        return cls_probs, None
    patch_probs = teacher_probs(
        ibot_loss, patch_logits.float(), cfg.ibot.centering, teacher_temp,
        n_masked_patches_tensor=batch["n_masked_patches"].clone(),
    )
    return cls_probs, patch_probs


class DINOv2(nn.Module):
    """The DINOv2 method (a ``dinoscale.methods.base.Method``): networks, views and loss. Its loss centers are
    buffers (``dino_loss.center``, ``ibot_loss.center``), checkpointed with it.

    The class attributes ``use_ibot`` and ``use_koleo`` switch parts of the objective off; the ``dino`` and
    ``ibot`` methods are subclasses that do just that (``dinoscale/methods/dino.py``, ``ibot.py``).

    With ``gram.enabled`` the loss adds DINOv3's Gram anchoring of the student's global-crop patch features
    (``dinoscale.methods.gram``): the Gram teacher is a frozen and checkpointed network of the method
    (:meth:`frozen_networks`, :meth:`checkpointed_networks`), copied from the EMA teacher in :meth:`before_step`.
    """

    uses_teacher = True
    use_ibot = True  # masked-patch loss (off: no masks, no iBOT head, loss or center)
    use_koleo = True  # KoLeo regulariser on the student's global [CLS] tokens

    def __init__(self, cfg: DictConfig):
        super().__init__()
        for section in ("dino", "ibot") if self.use_ibot else ("dino",):
            if cfg[section].centering not in ("centering", "sinkhorn_knopp"):
                raise ValueError(
                    f"{section}.centering must be 'centering' or 'sinkhorn_knopp', got '{cfg[section].centering}'"
                )
        self.cfg = cfg
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum)
        if self.use_ibot:
            ibot_dim = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
            self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.dino.student_temp, cfg.dino.center_momentum)
        if self.use_koleo:
            self.koleo_loss = KoLeoLoss(distributed=cfg.dino.koleo_distributed)
        self.gram = GramAnchor(cfg) if cfg.gram.enabled else None  # not a submodule: no method state

    def build_networks(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        student, teacher = build_networks(self.cfg, with_ibot=self.use_ibot)
        if not self.use_ibot:
            # Never masked, so never given a gradient: keep it out of the optimizer (whose checkpointed state
            # must cover every parameter it optimizes). It is still exported with the backbone.
            student["backbone"].mask_token.requires_grad_(False)
        if self.gram is not None:
            self.gram.build_network(self.cfg.model)
        return student, teacher

    def frozen_networks(self) -> dict[str, nn.Module]:
        """The Gram teacher (with ``gram.enabled``), for the loop to place, cast and shard."""
        return {"gram_teacher": self.gram.network} if self.gram is not None else {}

    def checkpointed_networks(self, step: int) -> dict[str, nn.Module]:
        """The Gram teacher once it holds a copy of the EMA teacher (after ``gram.it_load_ema_teacher``)."""
        if self.gram is None or not self.gram.holds_weights_after(step):
            return {}
        return {"gram_teacher": self.gram.network}

    def before_step(self, step: int, teacher: nn.ModuleDict) -> None:
        """Before ``step``'s forward: the Gram teacher's copy of the EMA teacher when due."""
        if self.gram is not None:
            self.gram.before_step(step, teacher)

    def build_transform(self) -> MultiCropAugmentation:
        return multicrop_transform(self.cfg.crops, local_crops_number=self.cfg.crops.local_crops_number,
                                   gram=self.gram is not None)

    def build_collate(self, patch_size: int):
        """Multi-crop collate with iBOT block masks on the global crops' patch grid (none without iBOT)."""
        return multicrop_collate(
            self.cfg.crops,
            patch_size,
            mask_probability=self.cfg.ibot.mask_sample_probability if self.use_ibot else 0.0,
            mask_ratio_min_max=self.cfg.ibot.mask_ratio_min_max,
        )

    @torch.no_grad()
    def head_init_inputs(self, backbone: nn.Module, batch: dict) -> dict[str, list[torch.Tensor]]:
        """What each head is applied to in training, seen as the teacher sees it (the global crops, unmasked):
        the [CLS] tokens for ``dino_head``, the tokens at the masked positions for ``ibot_head`` (both for the
        shared head). The data of the heads' k-means initialisation (``dinoscale.train.continue_from``).

        Each head's inputs come as parts, one per global crop and kind of token, each holding this rank's images
        in order: concatenating every part over the ranks, part after part, gives a one-process run's order."""
        out = backbone(batch["global_crops"], is_training=True)
        cls_parts = list(out["x_norm_clstoken"].chunk(2))  # crop A, crop B (crop-major batch)
        if not self.use_ibot:
            return {"dino_head": cls_parts}
        mask_indices = batch["mask_indices"]  # ascending flat indices into (2B * N): crop A's come first
        in_crop_a = mask_indices < len(cls_parts[0]) * out["x_norm_patchtokens"].shape[1]
        patches = masked_patch_tokens(out, mask_indices)
        patch_parts = [patches[in_crop_a], patches[~in_crop_a]]
        if self.cfg.ibot.separate_head:
            return {"dino_head": cls_parts, "ibot_head": patch_parts}
        return {"dino_head": cls_parts + patch_parts}

    @torch.no_grad()
    def _teacher_targets(self, teacher: nn.ModuleDict, batch: dict, teacher_temp: float):
        """Teacher probabilities for the global-crop CLS tokens (crop order A, B) and the masked patches
        (None without iBOT)."""
        ibot_loss = self.ibot_loss if self.use_ibot else None
        return head_targets(teacher, batch, self.cfg, self.dino_loss, ibot_loss, teacher_temp)

    def forward(self, student: nn.ModuleDict, teacher: nn.ModuleDict, batch: dict, sched: dict):
        """Returns (total loss, dict of detached loss terms); ``sched`` holds this step's teacher_temp."""
        cls_probs, patch_probs = self._teacher_targets(teacher, batch, sched["teacher_temp"])

        has_local = batch["local_crops"].shape[0] > 0
        global_masks = batch["masks"] if self.use_ibot else None
        crops = [batch["global_crops"], batch["local_crops"]] if has_local else [batch["global_crops"]]
        masks = [global_masks, None] if has_local else [global_masks]
        outs = student["backbone"](crops, masks=masks, is_training=True)
        global_cls = outs[0]["x_norm_clstoken"]
        n_global = global_cls.shape[0]

        # Student heads: CLS of all crops (and masked patches, when the head is shared) in one pass.
        cls_tokens = torch.cat([global_cls] + ([outs[1]["x_norm_clstoken"]] if has_local else []))
        patches = masked_patch_tokens(outs[0], batch["mask_indices"]) if self.use_ibot else None
        cls_logits, patch_logits = head_logits(student, cls_tokens, patches)
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
        if self.gram is not None:
            p = student["backbone"].patch_size
            grid = (batch["global_crops"].shape[-2] // p, batch["global_crops"].shape[-1] // p)
            terms["gram"] = self.gram(outs[0]["x_norm_patchtokens"], batch, grid)
            total = total + sched.get("gram_loss_weight", self.cfg.gram.loss_weight) * terms["gram"]
        return total, {k: v.detach() for k, v in terms.items()}
