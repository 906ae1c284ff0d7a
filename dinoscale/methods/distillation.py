"""Distillation: students of any size learn from a frozen, pretrained teacher (DINOv2's recipe, DINOv3's students).

``method: distillation`` reads the ``distillation:`` section. The teacher (``distillation.teacher``) is one of

* a dinoscale run directory (``config.yaml`` + ``export/teacher_backbone.*`` and ``teacher_heads.*``, or its
  newest checkpoint): its backbone and, for the DINO-family methods, its DINO/iBOT heads;
* any backbone ``dinoscale.eval.backbones.load_backbone`` builds: a ``dinoscale.hub`` name (``dinov2_vitg14``,
  ``teacher_weights=official`` or a file), or an architecture of ``dinoscale.models.factory`` with
  ``teacher_model_args`` and weights of any layout ``dinoscale.hub`` reads (official, timm, Hugging Face);
* ``timm:NAME``: ``timm.create_model(NAME, **teacher_model_args)`` (``teacher_weights``: a file, or ``official``
  for timm's pretrained weights).

It never trains: the method holds it outside its parameters and state (``frozen_networks()``), and the loop
casts it to the compute dtype, moves it to the device and shards it with FSDP2 when there is a process group
(``dinoscale.parallel.parallelize_frozen``); it runs under ``torch.no_grad`` on the global crops only.

Two objectives (``distillation.objective``; ``auto`` picks ``heads`` when the teacher has a DINO head):

* ``heads``, DINOv2's distillation: the DINO [CLS] loss, the iBOT patch loss and KoLeo of DINOv2
  (``dinoscale.losses.dino``, ``ibot``, ``koleo``), the targets from the teacher's heads on the same multi-crop
  batch, centred (or Sinkhorn-Knopp) and sharpened as DINOv2 does (``dino.centering``, ``teacher:``). The
  student's heads start fresh, with the teacher's number of prototypes. As in DINOv2 and DINOv3's distillation
  the student's crops are not masked (``distillation.mask_student``): the iBOT loss is taken at the drawn mask
  positions of the unmasked crops.
* ``features``, head-free (``dinoscale.losses.feature_distillation``): a small projector per token type maps the
  student's [CLS] and patch tokens to the teacher's width; they regress the teacher's standardised tokens of the
  same global crop (patch grids of other sizes are resized to the student's), and the local crops' [CLS] the
  teacher's [CLS] of both global crops of their image.

What training evaluates and exports as ``teacher`` is, as for every method here, the EMA of the student (the
``teacher`` the loop passes to :meth:`Distillation.forward`, unused by the loss). Further students
(``distillation.students``, DINOv3's multi-student distillation) are trained in the same step, on every rank,
from the same teacher outputs, computed once per batch: each is a complete student under ``student["students"]``
with its own heads or projectors, optimizer groups and EMA, exported as ``teacher_<name>_backbone``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinoscale.checkpoint import latest_checkpoint, read_dcp_checkpoint
from dinoscale.config import load_config
from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.eval.backbones import load_backbone, parse_model_args
from dinoscale.hub import load_state_dict_any
from dinoscale.hub.io import read_checkpoint
from dinoscale.losses.dino import DINOLoss, dino_cls_loss
from dinoscale.losses.feature_distillation import FEATURE_LOSSES, feature_distillation_loss
from dinoscale.losses.ibot import iBOTPatchLoss
from dinoscale.losses.koleo import KoLeoLoss
from dinoscale.methods.base import FURTHER_STUDENTS, student_units
from dinoscale.methods.dinov2 import head_logits, head_targets, masked_patch_tokens
from dinoscale.methods.views import multicrop_collate, multicrop_transform
from dinoscale.models.factory import build_backbone
from dinoscale.models.heads import DINOHead
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

log = logging.getLogger("dinoscale")

__all__ = ["Distillation", "backbone_tokens", "load_frozen_teacher"]

OBJECTIVES = ("auto", "heads", "features")


# ------------------------------------------------------------------------------------------------ the teacher


def _run_weights(run_dir: Path) -> tuple[dict, dict]:
    """``(backbone state, heads state)`` of a run: its export when there is one, else its newest checkpoint's
    EMA teacher (or student, for methods without one)."""
    export = run_dir / "export"
    for ext in (".safetensors", ".pth"):
        if (export / f"teacher_backbone{ext}").is_file():
            heads = export / f"teacher_heads{ext}"
            return read_checkpoint(export / f"teacher_backbone{ext}"), read_checkpoint(heads) if heads.is_file() else {}
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"distillation.teacher={run_dir} is a run directory with neither export/teacher_backbone.*"
                                " nor a checkpoint")
    state = read_dcp_checkpoint(latest)
    network = state.get("teacher") or state.get("student") or {}
    backbone = {k[len("backbone."):]: v for k, v in network.items() if k.startswith("backbone.")}
    return backbone, {k: v for k, v in network.items() if not k.startswith("backbone.")}


def _head(section: DictConfig, in_dim: int, n_prototypes: int | None = None) -> DINOHead:
    """A DINO/iBOT head as a ``dino:`` or ``ibot:`` config section describes it."""
    return DINOHead(in_dim=in_dim, out_dim=n_prototypes or section.head_n_prototypes,
                    hidden_dim=section.head_hidden_dim, bottleneck_dim=section.head_bottleneck_dim,
                    nlayers=section.head_nlayers)


def _run_teacher(run_dir: Path) -> dict[str, nn.Module]:
    """The backbone and the DINO/iBOT heads (those the run has) of a dinoscale run directory."""
    run_cfg = load_config(run_dir / "config.yaml")
    backbone_state, heads_state = _run_weights(run_dir)
    backbone = build_backbone(run_cfg.model, drop_path_rate=0.0)
    load_state_dict_any(backbone, backbone_state)
    parts: dict[str, nn.Module] = {"backbone": backbone}
    for key, section in (("dino_head", run_cfg.dino), ("ibot_head", run_cfg.ibot)):
        state = {k[len(key) + 1:]: v for k, v in heads_state.items() if k.startswith(key + ".")}
        if state:
            head = _head(section, backbone.embed_dim, n_prototypes=state["last_layer.weight_v"].shape[0])
            head.load_state_dict(state, strict=True)
            parts[key] = head
    return parts


def _timm_teacher(name: str, weights: str | None, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` without a classifier, with ``weights`` (a file, or ``official``)."""
    import timm  # lazily: timm is needed only for a timm teacher (a test and optional dependency)

    model = timm.create_model(name, pretrained=weights == "official", num_classes=0, **kwargs)
    if weights and weights != "official":
        timm.models.load_checkpoint(model, weights, strict=True)
    return model


def load_frozen_teacher(section: DictConfig) -> nn.ModuleDict:
    """The teacher ``distillation.teacher`` names (see the module docstring), frozen and in eval mode, on the CPU:
    ``backbone`` and, for a run directory of a DINO-family method, ``dino_head`` (and ``ibot_head``).

    Building it draws initial weights from torch's RNG before the weights are loaded; the RNG state is restored
    afterwards, so the student's initial weights do not depend on the teacher.
    """
    spec, weights = section.teacher, section.teacher_weights
    if not spec:
        raise ValueError("method distillation needs a teacher: set distillation.teacher to a run directory, a "
                         "dinoscale.hub name, an architecture of dinoscale.models.factory or timm:NAME")
    kwargs = parse_model_args(section.teacher_model_args)
    with torch.random.fork_rng(devices=[]):
        if spec.startswith("timm:"):
            parts = {"backbone": _timm_teacher(spec[len("timm:"):], weights, kwargs)}
        elif Path(spec).is_dir() and (Path(spec) / "config.yaml").is_file():
            parts = _run_teacher(Path(spec))
        else:
            if weights is None:
                log.warning("distillation.teacher=%s has no distillation.teacher_weights: the teacher keeps its "
                            "random initial weights", spec)
            parts = {"backbone": load_backbone(spec, weights, model_kwargs=kwargs)}
    teacher = nn.ModuleDict(parts)
    teacher.eval().requires_grad_(False)
    return teacher


def backbone_tokens(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``([CLS] (B, D), patch tokens (B, N, D), patch grid (h, w))`` of a backbone's normalised output.

    A ``DinoVisionTransformer`` or ``DinoV3VisionTransformer`` (any layout dinoscale loads, e.g. a released DINOv3
    teacher from its Hugging Face folder) gives its ``x_norm_*`` tokens; a timm ViT its
    ``forward_features`` (after the final norm) without the prefix tokens ([CLS], registers), and the mean of its
    patch tokens as [CLS] when it has no class token.
    """
    height, width = images.shape[-2:]
    if isinstance(backbone, (DinoVisionTransformer, DinoV3VisionTransformer)):
        out = backbone(images, is_training=True)
        p = backbone.patch_size
        return out["x_norm_clstoken"], out["x_norm_patchtokens"], (height // p, width // p)
    tokens = backbone.forward_features(images)
    patches = tokens[:, backbone.num_prefix_tokens:]
    cls = tokens[:, 0] if getattr(backbone, "cls_token", None) is not None else patches.mean(dim=1)
    ph, pw = backbone.patch_embed.patch_size
    return cls, patches, (height // ph, width // pw)


def resize_patch_grid(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, D)`` patch tokens on the ``grid`` (h, w) resampled to ``size`` (bilinear, antialiased)."""
    if tuple(grid) == tuple(size):
        return tokens
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} patch tokens do not form the {grid[0]} x {grid[1]} patch grid of the images")
    maps = tokens.transpose(1, 2).reshape(b, d, *grid).float()
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return maps.flatten(2).transpose(1, 2).to(tokens.dtype)


def feature_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The head-free objective's student projector: ``Linear -> GELU -> Linear`` to the teacher's width."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


# ------------------------------------------------------------------------------------------------ the method


def further_student_models(cfg: DictConfig) -> dict[str, DictConfig]:
    """``distillation.students`` as ``name -> model: section`` (``model:`` with each entry's keys set)."""
    models = {}
    for i, entry in enumerate(cfg.distillation.students, start=1):
        entry = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else dict(entry)
        name = str(entry.pop("name", f"student{i}"))
        unknown = sorted(set(entry) - set(cfg.model))
        if unknown:
            raise ValueError(f"distillation.students[{i - 1}] sets {unknown}, which are not model: keys "
                             f"(valid: name, {', '.join(cfg.model)})")
        if not name.isidentifier() or name in models:
            raise ValueError(f"distillation.students[{i - 1}]: name '{name}' must be a unique identifier")
        models[name] = OmegaConf.merge(cfg.model, entry)
    return models


class Distillation(nn.Module):
    """Distillation from a frozen teacher (a ``dinoscale.methods.base.Method``); see the module docstring.

    Its state is that of the DINO/iBOT targets (``dino_loss.center``, ``ibot_loss.center``) with the ``heads``
    objective, nothing with ``features``. The frozen teacher is not part of it (not a submodule): it is handed to
    the loop by :meth:`frozen_networks` and reloaded from ``distillation.teacher`` on every start.
    """

    uses_teacher = True  # the EMA of the student: what is evaluated and exported

    def __init__(self, cfg: DictConfig):
        super().__init__()
        section = cfg.distillation
        if section.objective not in OBJECTIVES:
            raise ValueError(f"distillation.objective must be one of {OBJECTIVES}, got '{section.objective}'")
        if section.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"distillation.feature_loss must be one of {FEATURE_LOSSES}, got '{section.feature_loss}'")
        self.cfg = cfg
        self.further_models = further_student_models(cfg)
        self._frozen = {"teacher": load_frozen_teacher(section)}  # a dict: not a submodule, not in the state
        teacher = self._frozen["teacher"]
        has_heads = "dino_head" in teacher
        self.objective = ("heads" if has_heads else "features") if section.objective == "auto" else section.objective
        if self.objective == "heads":
            self._check_heads(teacher)
            for name in ("dino", "ibot"):
                if cfg[name].centering not in ("centering", "sinkhorn_knopp"):
                    raise ValueError(f"{name}.centering must be 'centering' or 'sinkhorn_knopp', "
                                     f"got '{cfg[name].centering}'")
            self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum)
            self.ibot_loss = iBOTPatchLoss(self._ibot_prototypes(), cfg.dino.student_temp, cfg.dino.center_momentum)
            self.koleo_loss = KoLeoLoss(distributed=cfg.dino.koleo_distributed)
        log.info("distillation from %s (%s objective)", section.teacher, self.objective)

    # -- configuration checks

    def _ibot_prototypes(self) -> int:
        """The width of the student's iBOT logits: its iBOT head's, or its DINO head's when iBOT shares it."""
        return self.cfg.ibot.head_n_prototypes if self.cfg.ibot.separate_head else self.cfg.dino.head_n_prototypes

    def _check_heads(self, teacher: nn.ModuleDict) -> None:
        """The heads objective compares the student's and the teacher's prototypes and patch positions."""
        if "dino_head" not in teacher:
            raise ValueError(f"distillation.objective=heads needs a teacher with DINO/iBOT heads (a dinoscale run "
                             f"directory of a DINO-family method); {self.cfg.distillation.teacher} has none: use "
                             "distillation.objective=features")
        teacher_dino = teacher["dino_head"].out_dim
        teacher_ibot = teacher["ibot_head"].out_dim if "ibot_head" in teacher else teacher_dino
        if self.cfg.dino.head_n_prototypes != teacher_dino:
            raise ValueError(f"dino.head_n_prototypes={self.cfg.dino.head_n_prototypes}, but the teacher's DINO head "
                             f"has {teacher_dino} prototypes: set dino.head_n_prototypes={teacher_dino}")
        if self._ibot_prototypes() != teacher_ibot:
            which = "ibot.head_n_prototypes" if self.cfg.ibot.separate_head else "dino.head_n_prototypes (shared)"
            raise ValueError(f"the student's iBOT logits ({which}) have {self._ibot_prototypes()} prototypes, the "
                             f"teacher's {teacher_ibot}: make them equal")
        patch_sizes = {"model": self.cfg.model.patch_size,
                       **{f"distillation.students.{n}": m.patch_size for n, m in self.further_models.items()}}
        teacher_patch = teacher["backbone"].patch_size
        wrong = {k: v for k, v in patch_sizes.items() if v != teacher_patch}
        if wrong:
            raise ValueError(f"the heads objective compares patches at the same positions: the teacher's patch size is "
                             f"{teacher_patch}, {wrong} differ")

    # -- the Method contract

    def frozen_networks(self) -> dict[str, nn.Module]:
        """The frozen teacher, for the loop to place, cast and shard (``dinoscale.methods.base.frozen_networks``)."""
        return self._frozen

    @property
    def frozen_teacher(self) -> nn.ModuleDict:
        return self._frozen["teacher"]

    def _student(self, model_cfg: DictConfig, drop_path_rate: float) -> nn.ModuleDict:
        """One student: its backbone (built first), then its heads or projectors."""
        backbone = build_backbone(model_cfg, drop_path_rate=drop_path_rate)
        parts: dict[str, nn.Module] = {"backbone": backbone}
        if self.objective == "heads":
            parts["dino_head"] = _head(self.cfg.dino, backbone.embed_dim)
            if self.cfg.ibot.separate_head:
                parts["ibot_head"] = _head(self.cfg.ibot, backbone.embed_dim)
        else:
            section, teacher_dim = self.cfg.distillation, self.frozen_teacher["backbone"].embed_dim
            parts["cls_projector"] = feature_projector(backbone.embed_dim, section.projector_hidden_dim, teacher_dim)
            parts["patch_projector"] = feature_projector(backbone.embed_dim, section.projector_hidden_dim, teacher_dim)
        return nn.ModuleDict(parts)

    def _further_student(self, model_cfg: DictConfig, drop_path_rate: float) -> nn.ModuleDict:
        """A further student, drawn from ``train.seed`` as if it were the only one: it starts where a run
        distilling it alone starts (the RNG stream of the others is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            return self._student(model_cfg, drop_path_rate)

    def build_networks(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """The students (the first from ``model:``, then ``distillation.students``) and their EMA, drop path 0."""
        nets = []
        for drop_path in (None, 0.0):
            first = self._student(self.cfg.model, self.cfg.model.drop_path_rate if drop_path is None else drop_path)
            further = {name: self._further_student(m, m.drop_path_rate if drop_path is None else drop_path)
                       for name, m in self.further_models.items()}
            if further:
                first[FURTHER_STUDENTS] = nn.ModuleDict(further)
            nets.append(first)
        if not (self.objective == "heads" and self.cfg.distillation.mask_student):
            for unit in student_units(nets[0]).values():
                # Never masked, so never given a gradient: keep it out of the optimizer (whose checkpointed state
                # must cover every parameter it optimizes). It is still exported with the backbone.
                unit["backbone"].mask_token.requires_grad_(False)
        return nets[0], nets[1]

    def build_transform(self) -> MultiCropAugmentation:
        return multicrop_transform(self.cfg.crops, local_crops_number=self.cfg.crops.local_crops_number)

    def build_collate(self, patch_size: int):
        """Multi-crop collate; the heads objective draws iBOT mask positions on the global crops' patch grid."""
        return multicrop_collate(
            self.cfg.crops,
            patch_size,
            mask_probability=self.cfg.ibot.mask_sample_probability if self.objective == "heads" else 0.0,
            mask_ratio_min_max=self.cfg.ibot.mask_ratio_min_max,
        )

    # -- the loss

    def _head_targets(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher's DINO targets of the global crops' [CLS] (crop order A, B) and iBOT targets of the
        patches at the mask positions, as DINOv2 makes its EMA teacher's."""
        return head_targets(self.frozen_teacher, batch, self.cfg, self.dino_loss, self.ibot_loss, teacher_temp)

    def _heads_loss(self, unit: nn.ModuleDict, batch: dict, targets) -> tuple[torch.Tensor, dict]:
        """DINOv2's loss of one student against the teacher's targets (DINO [CLS], KoLeo, iBOT)."""
        cls_probs, patch_probs = targets
        masks = batch["masks"] if self.cfg.distillation.mask_student else None
        has_local = batch["local_crops"].shape[0] > 0
        crops = [batch["global_crops"], batch["local_crops"]] if has_local else [batch["global_crops"]]
        outs = unit["backbone"](crops, masks=[masks, None][: len(crops)], is_training=True)
        global_cls = outs[0]["x_norm_clstoken"]
        n_global = global_cls.shape[0]
        cls_tokens = torch.cat([global_cls] + ([outs[1]["x_norm_clstoken"]] if has_local else []))
        cls_logits, patch_logits = head_logits(unit, cls_tokens, masked_patch_tokens(outs[0], batch["mask_indices"]))
        cls_logits = cls_logits.float()
        global_term, local_term = dino_cls_loss(self.dino_loss, student_global=cls_logits[:n_global],
                                                student_local=cls_logits[n_global:] if has_local else None,
                                                teacher_probs=cls_probs)
        terms = {"dino_global": global_term, "dino_local": local_term,
                 "koleo": sum(self.koleo_loss(p.float()) for p in global_cls.chunk(2)),
                 "ibot": self.ibot_loss.forward_masked(patch_logits.float(), patch_probs,
                                                       student_masks_flat=batch["masks"],
                                                       n_masked_patches=batch["n_masked_patches"],
                                                       masks_weight=batch["masks_weight"])}
        total = (self.cfg.dino.loss_weight * (global_term + local_term)
                 + self.cfg.dino.koleo_loss_weight * terms["koleo"] + self.cfg.ibot.loss_weight * terms["ibot"])
        return total, terms

    @torch.no_grad()
    def _feature_targets(self, batch: dict):
        """The teacher's [CLS] and patch tokens of the global crops, and their patch grid."""
        return backbone_tokens(self.frozen_teacher["backbone"], batch["global_crops"])

    def _features_loss(self, unit: nn.ModuleDict, batch: dict, targets) -> tuple[torch.Tensor, dict]:
        """The head-free loss of one student: [CLS] and patches of the same view, local [CLS] to global [CLS]."""
        teacher_cls, teacher_patches, teacher_grid = targets
        kind, section = self.cfg.distillation.feature_loss, self.cfg.distillation
        has_local = batch["local_crops"].shape[0] > 0
        crops = [batch["global_crops"], batch["local_crops"]] if has_local else [batch["global_crops"]]
        outs = unit["backbone"](crops, is_training=True)
        p = unit["backbone"].patch_size
        grid = (batch["global_crops"].shape[-2] // p, batch["global_crops"].shape[-1] // p)
        patch_target = resize_patch_grid(teacher_patches, teacher_grid, grid)
        terms = {
            "feat_cls": feature_distillation_loss(unit["cls_projector"](outs[0]["x_norm_clstoken"]), teacher_cls, kind),
            "feat_patch": feature_distillation_loss(unit["patch_projector"](outs[0]["x_norm_patchtokens"]),
                                                    patch_target, kind),
        }
        if has_local:  # crop-major rows: local crop i of image b is row i * B + b; global crop A of b is row b
            local = unit["cls_projector"](outs[1]["x_norm_clstoken"])
            n_local = int(local.shape[0]) * 2 // int(teacher_cls.shape[0])
            terms["feat_local"] = sum(feature_distillation_loss(local, crop.repeat(n_local, 1), kind)
                                      for crop in teacher_cls.chunk(2)) / 2
        else:
            terms["feat_local"] = terms["feat_cls"].new_zeros(())
        total = (section.feature_cls_weight * (terms["feat_cls"] + terms["feat_local"])
                 + section.feature_patch_weight * terms["feat_patch"])
        return total, terms

    def forward(self, student: nn.ModuleDict, teacher: nn.ModuleDict, batch: dict, sched: dict):
        """The summed loss of every student against the frozen teacher's outputs on ``batch`` (computed once);
        the terms of a further student ``S`` are logged as ``S/<term>``. ``teacher`` (the EMA) is not used."""
        if self.objective == "heads":
            targets, student_loss = self._head_targets(batch, sched["teacher_temp"]), self._heads_loss
        else:
            targets, student_loss = self._feature_targets(batch), self._features_loss
        total, terms = None, {}
        for name, unit in student_units(student).items():
            loss, unit_terms = student_loss(unit, batch, targets)
            total = loss if total is None else total + loss
            terms.update({f"{name}/{k}" if name else k: v.detach() for k, v in unit_terms.items()})
        return total, terms
