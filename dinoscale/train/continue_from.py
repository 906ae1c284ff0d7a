"""Continuing self-supervised training from pretrained weights (``model.pretrained_weights``, ``continued:``).

Released DINOv2/DINOv3 backbones come without the DINO/iBOT heads they were trained with; training them further
with fresh random heads pulls the backbone towards arbitrary targets and its kNN accuracy collapses. This module
owns what makes continuing work, in the order :func:`dinoscale.train.build.build_networks` runs it:

1. :func:`load_pretrained_backbone`: the weights into the student's backbone; an architecture that differs from
   the configured one is an error naming both and the config keys that would match, raised before training.
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
    flatten_state_dict,
    load_state_dict_any,
    read_checkpoint,
    select_backbone,
    strip_wrapper_keys,
)
from dinoscale.methods.head_init import bottleneck_features, prototypes_from_features, set_prototypes_
from dinoscale.models.factory import ARCHS

log = logging.getLogger("dinoscale")

__all__ = [
    "PretrainedArchitectureError",
    "backbone_architecture",
    "check_continued",
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


def load_pretrained_backbone(backbone: nn.Module, model_cfg: DictConfig) -> str:
    """Load ``model_cfg.pretrained_weights`` (any layout ``dinoscale.hub`` reads) into ``backbone``, strictly;
    returns the detected layout. Raises :class:`PretrainedArchitectureError` naming the checkpoint's and the
    configured architecture and the settings that match the checkpoint when they differ, else the hub's
    :class:`~dinoscale.hub.WeightsLoadError` (missing, unexpected and mis-shaped keys)."""
    source = str(model_cfg.pretrained_weights)
    raw = read_checkpoint(source)  # read once: the check below and the load share it
    try:
        # The config's interpolate_* keys decide, for the student and the teacher alike (not the weights' source).
        return load_state_dict_any(backbone, raw, interpolation="model")
    except WeightsLoadError as exc:
        try:
            found = backbone_architecture(convert_to_dinov2(select_backbone(strip_wrapper_keys(
                flatten_state_dict(raw)))[0])[0])
        except (WeightsLoadError, ValueError, KeyError):
            found = None  # not a backbone we can describe: the hub's message says what is there
        configured = backbone_architecture(backbone.state_dict())
        if found is None or found == configured:
            raise WeightsLoadError(f"model.pretrained_weights={source}: {exc}") from exc
        differ = ", ".join(key for key in found if found[key] != configured[key])
        raise PretrainedArchitectureError(
            f"model.pretrained_weights={source} does not fit the configured model ({differ} differ): the "
            f"checkpoint has {_summary(found)}; the config (model.arch={model_cfg.arch}) builds "
            f"{_summary(configured)}. To continue from these weights set {_matching_settings(found, model_cfg)}\n"
            + str(exc)
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
