"""The backbone an evaluation runs on, from command-line options, a hub name, a config or a run directory.

``load_backbone`` builds a frozen backbone from a ``dinoscale.hub`` name, an architecture name of
``dinoscale.models.factory``, a training config or a training output directory, and loads weights of any
layout ``dinoscale.hub.load_state_dict_any`` understands. ``add_backbone_args`` / ``backbone_from_args`` are
the same options for every evaluation CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from dinoscale import hub
from dinoscale.checkpoint import latest_checkpoint
from dinoscale.config import load_config
from dinoscale.models.factory import ARCHS, DINOV3_ARCHS, build_backbone


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as mlp or swiglufused


def parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
    """``["embed_dim=32", "depth=2"]`` -> ``{"embed_dim": 32, "depth": 2}`` (Python literals)."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model argument {item!r} is not KEY=VALUE")
        kwargs[key.strip()] = _parse_value(value.strip())
    return kwargs


def run_weights(run_dir: Path) -> Path:
    """The best backbone weights of a training output directory (export first, else newest checkpoint)."""
    for name in ("teacher_backbone.safetensors", "teacher_backbone.pth"):
        if (run_dir / "export" / name).is_file():
            return run_dir / "export" / name
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has config.yaml but neither export/teacher_backbone.* nor a checkpoint")
    return latest


def load_backbone(
    arch: Optional[str] = None,
    weights: Optional[str] = None,
    *,
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> torch.nn.Module:
    """A frozen (eval, no grad) backbone for evaluation.

    * ``arch`` a ``dinoscale.hub`` name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ``dinov3_vitb16``, ...):
      built by ``hub.load(arch, weights=weights, **model_kwargs)``;
    * ``arch`` an architecture of ``dinoscale.models.factory.ARCHS`` (``vit_small``, ``vit_base``, ...)
      with ``model_kwargs`` (patch_size, num_register_tokens, embed_dim, ...);
    * ``config`` a dinoscale training config (+ ``overrides``): the backbone of ``model:``;
    * ``weights`` a training output directory (holding ``config.yaml``): its config and its
      exported teacher (or newest checkpoint).

    ``weights`` may be any file/directory ``dinoscale.hub.load_state_dict_any`` understands
    (official DINOv2 / DINOv3 .pth, timm, Hugging Face, dinoscale checkpoints).
    """
    model_kwargs = dict(model_kwargs or {})
    if weights is not None and Path(weights).is_dir() and (Path(weights) / "config.yaml").is_file():
        if config is None and arch is None:
            config = str(Path(weights) / "config.yaml")
        weights = str(run_weights(Path(weights)))
    if config is not None:
        if arch is not None:
            raise ValueError("give either an arch or a config, not both")
        cfg = load_config(config, overrides)
        model = build_backbone(cfg.model, drop_path_rate=0.0)
        if weights is not None:
            hub.load_state_dict_any(model, weights)
    elif arch in hub.MODELS or arch in hub.DINOV3_MODELS:
        model = hub.load(arch, weights=weights, **model_kwargs)
    elif arch in ARCHS or arch in DINOV3_ARCHS:
        model = build_backbone(arch, **model_kwargs)
        if weights is not None:
            hub.load_state_dict_any(model, weights)
    elif arch is None:
        raise ValueError("no backbone given: pass an arch (e.g. dinov2_vits14), a config, or a run directory")
    else:
        known = sorted(hub.MODELS) + sorted(hub.DINOV3_MODELS) + sorted(ARCHS)
        raise ValueError(f"unknown arch {arch!r}; choose one of {known}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_backbone_args(parser) -> None:
    """The backbone options shared by the evaluation CLIs (see ``backbone_from_args``)."""
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--arch", help="dinoscale.hub name (dinov2_vits14, dinov2_vitb14_reg, dinov3_vitb16, ...) or vit_small/..."
    )
    group.add_argument(
        "--weights",
        help="checkpoint: official DINOv2/DINOv3 .pth, timm/HF weights, a dinoscale export or checkpoint, or a run "
        "directory",
    )
    group.add_argument("--config", help="dinoscale training config whose model: section defines the backbone")
    group.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override")
    group.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="constructor argument for --arch, e.g. --model-arg embed_dim=32 --model-arg depth=2",
    )


def backbone_from_args(args) -> torch.nn.Module:
    return load_backbone(
        args.arch,
        args.weights,
        config=args.config,
        overrides=args.override,
        model_kwargs=parse_model_args(args.model_arg),
    )
