"""The Gram teacher of DINOv3's Gram anchoring (``gram:`` in the config; the loss is ``dinoscale.losses.gram``).

The Gram teacher is a frozen copy of the EMA teacher's backbone. Its patch features of the global crops give the
targets of the student's patch-feature Gram matrices. When it is copied is a function of the step alone, so a
resumed run copies exactly when the uninterrupted one did (``s0 = gram.it_load_ema_teacher``, ``f =
gram.update_frequency``)::

    copy at the start of step s (before its forward)  if  s == s0
                                                       or  rep_update and s > s0 and s >= it_first_update
                                                           and s % f == 0 and fewer than max_updates such
                                                           refreshes came before s

The Gram loss counts from step ``s0`` on: the run's last part (``s0`` inside the run), or a stage of its own
that resumes a run's checkpoint at ``s0`` (the checkpoint needs no Gram teacher then; one written after ``s0``
holds it, see :meth:`GramAnchor.holds_weights_after`). Its weight is ``sched["gram_loss_weight"]``
(``dinoscale.train.schedules``: ``gram.loss_weight``, or DINOv3's warm-up/cosine/constant schedule).

Layout: ``network`` is an ``nn.ModuleDict`` with a ``backbone`` of the student's architecture (drop path 0). The
method hands it to the loop as a frozen network (moved to the device in the compute dtype, sharded with
``parallel.parallelize_frozen`` like the EMA teacher, block by block) and as a checkpointed one. Its input is
``batch["global_crops"]``; a batch that also holds ``batch["gram_crops"]`` (the same crops at a higher
resolution: ``crops.gram_crops_size``, DINOv3's ``crops.gram_teacher_crops_size``, made by
``dinoscale.data.transforms.multicrop``) gives it those instead, and its ``(h, w)`` grid of patch features is
resized to the student's (``gram.global_teacher_resize_method``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dinoscale.losses.gram import GramLoss
from dinoscale.models.factory import build_backbone
from dinoscale.parallel import strip_wrapper_prefixes

log = logging.getLogger("dinoscale")

__all__ = ["GramAnchor", "copy_weights_", "resize_patch_features"]

TOKENS_USED = ("all", "masked", "unmasked")


def _local(t: torch.Tensor) -> torch.Tensor:
    # a DTensor parameter's shard (under no_grad, to_local() is the shard itself); a plain tensor as it is
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def copy_weights_(target: nn.Module, source: nn.Module) -> None:
    """Every parameter and buffer of ``source`` into ``target``'s, matched by name (wrapper components ignored),
    cast to ``target``'s dtype. Sharded modules must be sharded alike (then each rank copies its own shards)."""
    for kind in ("parameters", "buffers"):
        dst = {strip_wrapper_prefixes(n): t for n, t in getattr(target, f"named_{kind}")()}
        src = {strip_wrapper_prefixes(n): t for n, t in getattr(source, f"named_{kind}")()}
        if dst.keys() != src.keys():
            raise ValueError(f"the Gram teacher's {kind} are not the EMA teacher's: only in the Gram teacher "
                             f"{sorted(dst.keys() - src.keys())[:5]}, only in the EMA teacher "
                             f"{sorted(src.keys() - dst.keys())[:5]}")
        for name, t in dst.items():
            t_local, s_local = _local(t), _local(src[name])
            if t_local.shape != s_local.shape:
                raise ValueError(f"'{name}': Gram teacher shard {tuple(t_local.shape)} != EMA teacher shard "
                                 f"{tuple(s_local.shape)}; shard both alike")
            t_local.copy_(s_local)


def resize_patch_features(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], *, mode: str,
                          antialias: bool) -> torch.Tensor:
    """Patch features ``(B, h*w, D)`` on a ``grid=(h, w)`` -> ``(B, H*W, D)`` on ``size=(H, W)``, each feature
    channel interpolated as an image (``mode``: bicubic, bilinear, area, ...)."""
    (h, w), (H, W) = grid, size
    if (h, w) == (H, W):
        return patches
    B, N, D = patches.shape
    if N != h * w:
        raise ValueError(f"{N} patch features do not make a {h}x{w} grid")
    image = patches.transpose(1, 2).reshape(B, D, h, w)
    options = {} if mode in ("nearest", "area", "nearest-exact") else {"align_corners": False}
    if mode in ("bilinear", "bicubic"):
        options["antialias"] = antialias
    out = F.interpolate(image.float(), size=(H, W), mode=mode, **options)
    return out.reshape(B, D, H * W).transpose(1, 2).to(patches.dtype)


class GramAnchor:
    """The Gram teacher, when it is copied from the EMA teacher, and the Gram term of a batch (see the module
    docstring). Built by the method from ``cfg`` (``gram:``, ``model:``); not an ``nn.Module``: the network is
    the loop's to place, shard and checkpoint, never the method's state."""

    def __init__(self, cfg: DictConfig) -> None:
        g = cfg.gram
        if g.tokens_used not in TOKENS_USED:
            raise ValueError(f"gram.tokens_used must be one of {TOKENS_USED}, got {g.tokens_used!r}")
        if g.tokens_used != "all" and g.img_level:
            raise ValueError("gram.tokens_used masked/unmasked selects patches across images: set gram.img_level=false")
        if g.it_load_ema_teacher < 0:
            raise ValueError(f"gram.it_load_ema_teacher must be >= 0 (the step the Gram teacher is copied at), "
                             f"got {g.it_load_ema_teacher}")
        if g.rep_update and g.update_frequency <= 0:
            raise ValueError(f"gram.update_frequency must be > 0 with gram.rep_update, got {g.update_frequency}")
        self.cfg = g
        self.load_step = int(g.it_load_ema_teacher)
        self.loss = GramLoss(normalize=g.normalized, per_image=g.img_level, remove_neg=g.remove_neg,
                             remove_only_teacher_neg=g.remove_only_teacher_neg)
        self.network: nn.ModuleDict | None = None  # built by build_network, after the student and EMA teacher
        self.active = False  # whether this step's loss has a Gram term (set by before_step)

    def build_network(self, model_cfg: DictConfig) -> nn.ModuleDict:
        """The Gram teacher: the student's architecture without drop path, frozen, in eval mode (no RoPE
        augmentation). Built after the student, so the student's initial weights do not depend on it."""
        self.network = nn.ModuleDict({"backbone": build_backbone(model_cfg, drop_path_rate=0.0)})
        self.network.eval().requires_grad_(False)
        return self.network

    # ------------------------------------------------------------------ when

    def refresh_steps(self, before: int) -> list[int]:
        """The steps ``< before`` at whose start the Gram teacher is refreshed (after the first copy)."""
        g = self.cfg
        if not g.rep_update:
            return []
        f = int(g.update_frequency)
        first = max(self.load_step + 1, int(g.it_first_update))
        steps = list(range(-(-first // f) * f, before, f))
        return steps if g.max_updates is None else steps[: int(g.max_updates)]

    def copies_at(self, step: int) -> bool:
        """Whether the EMA teacher's backbone is copied into the Gram teacher at the start of ``step``."""
        return step == self.load_step or step in self.refresh_steps(step + 1)

    def holds_weights_after(self, step: int) -> bool:
        """Whether, after ``step`` optimizer steps, the Gram teacher holds a copy (so a checkpoint must hold it)."""
        return step > self.load_step

    def before_step(self, step: int, teacher: nn.ModuleDict) -> None:
        """Before ``step``'s forward (every rank): copy the EMA teacher's backbone when due; the loss counts from
        ``gram.it_load_ema_teacher`` on."""
        self.active = step >= self.load_step
        if self.copies_at(step):
            log.info("step %d: Gram teacher <- EMA teacher's backbone", step)
            copy_weights_(self.network["backbone"], teacher["backbone"])

    # ------------------------------------------------------------------ what

    @torch.no_grad()
    def targets(self, batch: dict, student_grid: tuple[int, int]) -> torch.Tensor:
        """The Gram teacher's normalised patch features ``(2B, h*w, D)`` of the global crops (of
        ``batch["gram_crops"]`` when there are, resized to ``student_grid``)."""
        images = batch.get("gram_crops", batch["global_crops"])
        backbone = self.network["backbone"]
        patches = backbone(images, is_training=True)["x_norm_patchtokens"]
        p = backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        return resize_patch_features(patches, grid, student_grid, mode=self.cfg.global_teacher_resize_method,
                                     antialias=self.cfg.global_teacher_resize_antialias)

    def __call__(self, student_patches: torch.Tensor, batch: dict, student_grid: tuple[int, int]) -> torch.Tensor:
        """The Gram loss of the student's patch features of the global crops ``(2B, N, D)`` (after the final
        norm, at the iBOT-masked input as the student saw it); a zero without gradient before ``s0``."""
        if not self.active:
            return student_patches.new_zeros((), dtype=torch.float32)
        teacher_patches = self.targets(batch, student_grid)
        if self.cfg.tokens_used != "all":
            keep = batch["masks"] if self.cfg.tokens_used == "masked" else ~batch["masks"]
            student_patches, teacher_patches = student_patches[keep], teacher_patches[keep]
        return self.loss(student_patches, teacher_patches)
