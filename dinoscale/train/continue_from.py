"""Continuing self-supervised training from pretrained weights (``model.pretrained_weights``, ``continued:``).

Released DINOv2/DINOv3 backbones come without the DINO/iBOT heads they were trained with; training them further
with fresh random heads pulls the backbone towards arbitrary targets and its kNN accuracy collapses. This module
owns what makes continuing work, in the order :func:`dinoscale.train.build.build_networks` runs it:

1. :func:`load_pretrained_backbone`: the weights into the student's backbone (a DINOv2-layout ViT or a DINOv3 one,
   ``model.arch: dinov3_*``, from any layout ``dinoscale.hub`` reads); an architecture that differs from the
   configured one (another size, FFN, register count, or the other family) is an error naming both and the config
   keys that would match, raised before training.
2. :func:`init_heads_from_data_` (``continued.head_init=kmeans``, new runs only: :func:`will_resume`): each head's
   prototypes from k-means of the features it is applied to, on a few training batches. The method says which
   features feed which head (``head_init_inputs``), ``dinoscale.methods.head_init`` does the k-means; here the
   features are collected, gathered from every rank, clustered, and rank 0's result is sent to all, so every rank
   starts with the same heads. The teacher is then copied from the student (backbone and heads).
3. The heads-only warm-up (``continued.backbone_warmup_steps``): the loop passes ``backbone_frozen`` (step <
   N) to ``dinoscale.train.step.train_step``, which freezes the backbone with ``dinoscale.train.optim.set_trainable_``;
   it follows from the step count, so a resume is exact. ``dinoscale.train.optim.init_state_`` gives the frozen
   parameters their (untouched) AdamW state from the start, so checkpoints taken during the warm-up hold it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from dinoscale import checkpoint, distributed
from dinoscale.data.seeding import derive_seed
from dinoscale.hub import (
    WeightsLoadError,
    convert_to_dinov2,
    convert_to_dinov3,
    flatten_state_dict,
    load_state_dict_any,
    read_checkpoint,
    select_backbone,
    strip_wrapper_keys,
)
from dinoscale.methods.head_init import bottleneck_features, prototypes_from_features, set_prototypes_
from dinoscale.models.factory import ARCHS, DINOV3_ARCHS
from dinoscale.models.vit_dinov3 import DINOV3_FFN_LAYERS, DinoV3VisionTransformer, swiglu_hidden_features

log = logging.getLogger("dinoscale")

__all__ = [
    "PretrainedArchitectureError",
    "backbone_architecture",
    "check_continued",
    "dinov3_backbone_architecture",
    "init_heads_from_data_",
    "load_pretrained_backbone",
    "will_resume",
]


class PretrainedArchitectureError(WeightsLoadError):
    """``model.pretrained_weights`` holds a backbone of another architecture than the configured one."""


def backbone_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, object] | None:
    """What a DINOv2-layout backbone state dict says of its architecture (None if it is not one): ``embed_dim``,
    ``depth``, ``patch_size``, ``registers``, ``ffn`` (``mlp`` or ``swiglu``), ``ffn_hidden`` and
    ``layerscale``. The head count leaves no trace in the weights."""
    if "cls_token" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        return None
    blocks = {key.split(".")[1] for key in state_dict if key.startswith("blocks.")}
    swiglu = state_dict.get("blocks.0.mlp.w12.weight")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    registers = state_dict.get("register_tokens")
    return {
        "embed_dim": state_dict["cls_token"].shape[-1],
        "depth": len(blocks),
        "patch_size": state_dict["patch_embed.proj.weight"].shape[-1],
        "registers": 0 if registers is None else registers.shape[1],
        "ffn": "swiglu" if swiglu is not None else "mlp",
        "ffn_hidden": swiglu.shape[0] // 2 if swiglu is not None else (fc1.shape[0] if fc1 is not None else None),
        "layerscale": "blocks.0.ls1.gamma" in state_dict,
    }


def _summary(arch: Mapping[str, object]) -> str:
    return (f"embed_dim {arch['embed_dim']}, depth {arch['depth']}, patch {arch['patch_size']}, "
            f"{arch['registers']} registers, {arch['ffn']} FFN of width {arch['ffn_hidden']}, "
            f"{'with' if arch['layerscale'] else 'no'} LayerScale")


def _matching_settings(found: Mapping[str, object], model_cfg: DictConfig) -> str:
    """The ``model.KEY=VALUE`` overrides under which the config builds ``found``'s shapes."""
    wanted: dict[str, object] = {}
    arch = next((name for name, args in ARCHS.items()
                 if (args["embed_dim"], args["depth"]) == (found["embed_dim"], found["depth"])), None)
    if arch is not None:
        wanted["arch"] = arch
        wanted.update({key: None for key in ("embed_dim", "depth", "num_heads")})  # the arch's own sizes
    else:
        wanted.update(embed_dim=found["embed_dim"], depth=found["depth"])
    wanted.update(patch_size=found["patch_size"], num_register_tokens=found["registers"])
    if found["ffn"] == "swiglu":
        wanted["ffn_layer"] = model_cfg.ffn_layer if model_cfg.ffn_layer.startswith("swiglu") else "swiglufused"
    else:
        wanted["ffn_layer"] = "mlp"
        if found["ffn_hidden"]:
            wanted["mlp_ratio"] = found["ffn_hidden"] / found["embed_dim"]
    if found["layerscale"] != (model_cfg.layerscale is not None):
        wanted["layerscale"] = 1.0e-5 if found["layerscale"] else None
    settings = [f"model.{key}={'null' if value is None else f'{value:g}' if isinstance(value, float) else value}"
                for key, value in wanted.items() if model_cfg[key] != value]
    if arch is None and model_cfg.embed_dim != found["embed_dim"]:
        settings.append(f"(and a model.num_heads that divides {found['embed_dim']})")
    return " ".join(settings)


def dinov3_backbone_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, object] | None:
    """What an official-layout DINOv3 backbone state dict says of its architecture (None if it is not one):
    ``embed_dim``, ``depth``, ``patch_size``, ``num_heads`` (from the RoPE periods, ``head_dim / 4`` of them; None
    when the weights do not hold them: timm, Hugging Face), ``storage_tokens``, ``ffn`` (``mlp`` or ``swiglu``),
    ``ffn_hidden``, ``qkv_bias``, ``layerscale`` and ``cls_norm`` (untied class-token norm)."""
    if "cls_token" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        return None
    dim = state_dict["cls_token"].shape[-1]
    blocks = {key.split(".")[1] for key in state_dict if key.startswith("blocks.")}
    w1 = state_dict.get("blocks.0.mlp.w1.weight")
    ffn_in = w1 if w1 is not None else state_dict.get("blocks.0.mlp.fc1.weight")
    storage = state_dict.get("storage_tokens")
    periods = state_dict.get("rope_embed.periods")
    heads = dim // (4 * periods.numel()) if periods is not None and periods.numel() else None
    return {
        "embed_dim": dim,
        "depth": len(blocks),
        "patch_size": state_dict["patch_embed.proj.weight"].shape[-1],
        "num_heads": heads,
        "storage_tokens": 0 if storage is None else storage.shape[1],
        "ffn": "swiglu" if w1 is not None else "mlp",
        "ffn_hidden": None if ffn_in is None else ffn_in.shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "layerscale": "blocks.0.ls1.gamma" in state_dict,
        "cls_norm": "cls_norm.weight" in state_dict,
    }


_FAMILY_NAMES = {"dinov2": "DINOv2-layout ViT (learned position embedding)", "dinov3": "DINOv3 ViT (RoPE)"}


def _checkpoint_architecture(raw: object) -> tuple[str, dict[str, object]] | None:
    """``(family, architecture)`` of the backbone in a checkpoint: ``"dinov2"`` when it has a learned position
    embedding (:func:`backbone_architecture`), else ``"dinov3"`` (:func:`dinov3_backbone_architecture`). None if it
    holds no backbone we can describe."""
    try:
        backbone = select_backbone(strip_wrapper_keys(flatten_state_dict(raw)))[0]
        as_dinov2 = convert_to_dinov2(backbone)[0]
        if "pos_embed" in as_dinov2:
            found = "dinov2", backbone_architecture(as_dinov2)
        else:
            found = "dinov3", dinov3_backbone_architecture(convert_to_dinov3(backbone)[0])
    except (WeightsLoadError, ValueError, KeyError, AttributeError, TypeError):
        return None  # not a backbone we can describe: the hub's message says what is there
    return None if found[1] is None else found


def _dinov3_summary(arch: Mapping[str, object]) -> str:
    heads = f", {arch['num_heads']} heads" if arch["num_heads"] else ""
    return (f"embed_dim {arch['embed_dim']}, depth {arch['depth']}{heads}, patch {arch['patch_size']}, "
            f"{arch['storage_tokens']} storage tokens, {arch['ffn']} FFN of width {arch['ffn_hidden']}, "
            f"{'with' if arch['qkv_bias'] else 'no'} qkv bias, {'with' if arch['layerscale'] else 'no'} LayerScale"
            + (", untied CLS norm" if arch["cls_norm"] else ""))


def _differing(found: Mapping[str, object], configured: Mapping[str, object]) -> list[str]:
    """The architecture entries that differ, leaving out what the loader makes up for: a DINOv3 checkpoint without
    qkv bias loads as a zero bias (timm's plain ``vit_*_dinov3``), and one without RoPE periods has no head count."""
    differ = []
    for key, value in found.items():
        if value == configured[key] or (key == "num_heads" and value is None):
            continue
        if key == "qkv_bias" and not value:
            continue
        differ.append(key)
    return differ


def _dinov3_ffn_hidden(args: Mapping[str, object], embed_dim: int) -> int:
    """The FFN width a DINOv3 architecture's arguments give at ``embed_dim`` (as ``Dinov3Block`` computes it)."""
    hidden = int(embed_dim * args["ffn_ratio"])
    align = DINOV3_FFN_LAYERS[args["ffn_layer"]]
    return hidden if align is None else swiglu_hidden_features(hidden, align)


def _dinov3_fits(found: Mapping[str, object], args: Mapping[str, object]) -> bool:
    """Whether the DINOv3 architecture ``args`` (a ``DINOV3_ARCHS`` entry) builds ``found`` once its sizes are set."""
    return (
        (DINOV3_FFN_LAYERS[args["ffn_layer"]] is not None) == (found["ffn"] == "swiglu")
        and _dinov3_ffn_hidden(args, found["embed_dim"]) == found["ffn_hidden"]
        and args.get("n_storage_tokens", 0) == found["storage_tokens"]
        and (args.get("layerscale_init") is not None) == found["layerscale"]
        and (args.get("qkv_bias", True) or not found["qkv_bias"])
        and args.get("untie_cls_and_patch_norms", False) == found["cls_norm"]
    )


def _dinov3_matching_settings(found: Mapping[str, object], model_cfg: DictConfig) -> str | None:
    """The ``model.KEY=VALUE`` overrides under which the config builds a DINOv3 ``found``; None if no
    ``DINOV3_ARCHS`` entry has its FFN, storage tokens and norms (the config sets sizes only)."""
    fitting = [name for name, args in DINOV3_ARCHS.items() if _dinov3_fits(found, args)]
    if not fitting:
        return None
    sized = [name for name in fitting
             if (DINOV3_ARCHS[name]["embed_dim"], DINOV3_ARCHS[name]["depth"]) == (found["embed_dim"], found["depth"])
             and found["num_heads"] in (None, DINOV3_ARCHS[name]["num_heads"])]
    wanted: dict[str, object] = {}
    if sized:  # a release's size: its own sizes, no overrides
        wanted.update(arch=sized[0], embed_dim=None, depth=None, num_heads=None)
    else:  # the configured arch if it fits, else the first that does, with the sizes set
        wanted.update(arch=model_cfg.arch if model_cfg.arch in fitting else fitting[0],
                      embed_dim=found["embed_dim"], depth=found["depth"])
        if found["num_heads"] is not None:
            wanted["num_heads"] = found["num_heads"]
    wanted["patch_size"] = found["patch_size"]
    settings = [f"model.{key}={'null' if value is None else value}" for key, value in wanted.items()
                if model_cfg[key] != value]
    if not sized and found["num_heads"] is None and model_cfg.embed_dim != found["embed_dim"]:
        settings.append(f"(and a model.num_heads with 4 * num_heads dividing {found['embed_dim']})")
    return " ".join(settings)


def _dinov2_matching_settings(found: Mapping[str, object], model_cfg: DictConfig) -> str:
    """:func:`_matching_settings`, with a DINOv2-layout arch named when the config builds a DINOv3 ViT."""
    settings = _matching_settings(found, model_cfg)
    if model_cfg.arch in DINOV3_ARCHS and "model.arch=" not in settings:
        # the sizes are set explicitly: any DINOv2-layout arch will do
        settings = " ".join(("model.arch=vit_small", settings)).strip()
    return settings


def load_pretrained_backbone(backbone: nn.Module, model_cfg: DictConfig) -> str:
    """Load ``model_cfg.pretrained_weights`` (any layout ``dinoscale.hub`` reads, for a DINOv2-layout or a DINOv3
    backbone) into ``backbone``, strictly; returns the detected layout. Raises :class:`PretrainedArchitectureError`
    naming the checkpoint's and the configured architecture and the settings that match the checkpoint when they
    differ, else the hub's :class:`~dinoscale.hub.WeightsLoadError` (missing, unexpected and mis-shaped keys)."""
    source = str(model_cfg.pretrained_weights)
    raw = read_checkpoint(source)  # read once: the check below and the load share it
    try:
        # The config's interpolate_* keys decide, for the student and the teacher alike (not the weights' source).
        return load_state_dict_any(backbone, raw, interpolation="model")
    except WeightsLoadError as exc:
        described = _checkpoint_architecture(raw)
        if described is None:
            raise WeightsLoadError(f"model.pretrained_weights={source}: {exc}") from exc
        family = "dinov3" if isinstance(backbone, DinoV3VisionTransformer) else "dinov2"
        describe = dinov3_backbone_architecture if family == "dinov3" else backbone_architecture
        configured = describe(backbone.state_dict())
        found_family, found = described
        summaries = {"dinov2": _summary, "dinov3": _dinov3_summary}
        if found_family == family:
            differ = _differing(found, configured)
            if not differ:
                raise WeightsLoadError(f"model.pretrained_weights={source}: {exc}") from exc
            what, has, builds = f"{', '.join(differ)} differ", "has", "builds"
        else:  # the other model family: say which each is
            what = f"a {_FAMILY_NAMES[found_family].split(' (')[0]} checkpoint"
            has, builds = f"is a {_FAMILY_NAMES[found_family]} with", f"builds a {_FAMILY_NAMES[family]} with"
        if found_family == "dinov3":
            settings = _dinov3_matching_settings(found, model_cfg)
        else:
            settings = _dinov2_matching_settings(found, model_cfg)
        advice = (f"To continue from these weights set {settings}" if settings is not None else
                  "No model.arch=dinov3_* has this FFN, storage tokens and norms (a config sets their sizes only)")
        raise PretrainedArchitectureError(
            f"model.pretrained_weights={source} does not fit the configured model ({what}): the checkpoint {has} "
            f"{summaries[found_family](found)}; the config (model.arch={model_cfg.arch}) {builds} "
            f"{summaries[family](configured)}. {advice}\n" + str(exc)
        ) from exc


def check_continued(continued: DictConfig) -> None:
    """Refuse values of the ``continued:`` section that mean nothing."""
    if continued.head_init not in ("random", "kmeans"):
        raise ValueError(f"continued.head_init must be 'random' or 'kmeans', got '{continued.head_init}'")
    for key, low in (("head_init_batches", 1), ("head_init_iterations", 0), ("head_init_max_features", 1),
                     ("backbone_warmup_steps", 0)):
        if continued[key] < low:
            raise ValueError(f"continued.{key} must be >= {low}, got {continued[key]}")


def will_resume(cfg: DictConfig) -> bool:
    """Whether this run will load a checkpoint of its output directory (then the heads come from there)."""
    return bool(cfg.train.resume and checkpoint.list_checkpoints(cfg.train.output_dir))


def _seeded_subset(x: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most ``limit`` rows of ``x``, chosen at random (seeded), in their order."""
    if x.shape[0] <= limit:
        return x
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return x[keep.to(x.device)]


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x``, concatenated in rank order (the ranks may hold different numbers of rows)."""
    if distributed.get_world_size() == 1:
        return x
    counts = distributed.all_gather_no_grad(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = distributed.all_gather_no_grad(padded).split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


@torch.no_grad()
def init_heads_from_data_(
    method: nn.Module,
    student: nn.ModuleDict,
    batches: Iterable[dict],
    continued: DictConfig,
    *,
    seed: int,
    autocast: Callable[[], AbstractContextManager],
) -> dict[str, int]:
    """Set the prototypes of the student's heads to the unit k-means centres of their bottleneck features over
    ``batches`` (this rank's device batches; ``continued.head_init_batches`` of them are used), gathered from every
    rank into the order of a one-process run (at most ``continued.head_init_max_features`` per head, a seeded
    subset of each batch's share). Collective: every rank calls it and ends with rank 0's prototypes, which
    depend on the seed only (not on the number of ranks, up to the rounding of the backbone's forward). The
    backbone runs without gradients, in eval mode (as the teacher). Returns the number of features each head's
    k-means saw."""
    if not callable(getattr(method, "head_init_inputs", None)):
        raise ValueError(f"continued.head_init=kmeans initialises DINO/iBOT heads; method "
                         f"'{method.cfg.method}' has none (use continued.head_init=random)")
    backbone = student["backbone"]
    was_training = backbone.training
    backbone.eval()
    per_batch_limit = math.ceil(continued.head_init_max_features / continued.head_init_batches)
    collected: dict[str, list[torch.Tensor]] = {}
    batch_iter = iter(batches)
    for index in range(continued.head_init_batches):
        with autocast():
            inputs = method.head_init_inputs(backbone, next(batch_iter))
        for name, parts in inputs.items():  # the same order on every rank: the gathers pair up
            # each part gathered over the ranks: the features of the global batch, in a one-process run's order
            features = torch.cat([_gather_rows(bottleneck_features(student[name], part)) for part in parts])
            collected.setdefault(name, []).append(
                _seeded_subset(features, per_batch_limit, derive_seed(seed, "head_init_subset", name, index)))
    backbone.train(was_training)

    rank = distributed.get_rank()
    used = {}
    for name, chunks in collected.items():
        features = torch.cat(chunks)
        head = student[name]
        n_prototypes = head.last_layer.out_features
        if features.shape[0] < n_prototypes:  # checked on every rank: they all stop
            per_batch = max(features.shape[0] / continued.head_init_batches, 1)
            raise ValueError(
                f"continued.head_init=kmeans: {name} has {n_prototypes} prototypes, but "
                f"{continued.head_init_batches} batches gave {features.shape[0]} features (at most "
                f"continued.head_init_max_features={continued.head_init_max_features}): set "
                f"continued.head_init_batches>={math.ceil(n_prototypes / per_batch)} and "
                f"continued.head_init_max_features>={n_prototypes}, or give the head fewer prototypes")
        if rank == 0:  # one k-means, sent to every rank exactly (the others add zeros)
            generator = torch.Generator(features.device).manual_seed(derive_seed(seed, "head_init_kmeans", name))
            prototypes = prototypes_from_features(head, features, iterations=continued.head_init_iterations,
                                                  generator=generator)
        else:
            prototypes = torch.zeros_like(head.last_layer.weight_v)
        set_prototypes_(head, distributed.all_reduce_sum_(prototypes))
        used[name] = features.shape[0]
    if rank == 0:
        log.info("heads initialised from k-means of the backbone's features: %s",
                 ", ".join(f"{name} {n} features" for name, n in used.items()))
    return used
