"""``load_state_dict_any``: backbone weights of any supported layout into a model, strictly.

A checkpoint (file, directory, URL or in-memory dict) is read (``dinoscale.hub.io``), its backbone found and
converted to the official layout (``dinoscale.hub.convert``), fitted to the model (position embedding of
another grid size, absent mask token) and loaded with ``strict=True``. On any mismatch nothing is loaded and
:class:`~dinoscale.hub.io.WeightsLoadError` lists the missing and unexpected keys and the shape mismatches.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch

from dinoscale.hub.convert import convert_to_dinov2, flatten_state_dict, is_square, select_backbone, strip_wrapper_keys
from dinoscale.hub.io import MAX_LISTED, WeightsLoadError, read_checkpoint
from dinoscale.models.vit import DinoVisionTransformer, resample_pos_embed

logger = logging.getLogger(__name__)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"({len(items)}): {shown}{more}"


def _fit_to_model(state_dict: dict[str, torch.Tensor], model: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """Interpolate a position embedding of another grid size; supply the mask token if absent."""
    target = model.state_dict()
    pos_embed = state_dict.get("pos_embed")
    want = target["pos_embed"].shape
    if pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape != want and pos_embed.shape[2] == want[2]:
        if is_square(pos_embed.shape[1] - 1) and is_square(want[1] - 1):
            side = math.isqrt(want[1] - 1)
            # Resample the way the model itself would for an image of its img_size, so the loaded model at
            # img_size reproduces the checkpoint's model at that input size.
            state_dict["pos_embed"] = resample_pos_embed(
                pos_embed,
                (side, side),
                interpolate_offset=model.interpolate_offset,
                interpolate_antialias=model.interpolate_antialias,
            )
    if "mask_token" not in state_dict:
        # Released inference checkpoints may omit it; it only matters for masked-image training.
        state_dict["mask_token"] = target["mask_token"].detach().clone()
    return state_dict


def _describe(model: torch.nn.Module) -> str:
    if isinstance(model, DinoVisionTransformer):
        return (
            f"DinoVisionTransformer(embed_dim={model.embed_dim}, depth={model.n_blocks}, "
            f"num_heads={model.num_heads}, patch_size={model.patch_size}, "
            f"num_register_tokens={model.num_register_tokens})"
        )
    return type(model).__name__


def load_state_dict_any(model: torch.nn.Module, obj_or_path: Mapping | str | os.PathLike) -> str:
    """Load backbone weights of any supported layout into ``model`` strictly; returns the detected layout.

    ``obj_or_path``: a state dict or checkpoint dict, a file (``.pth``/``.pt``/``.bin``/``.safetensors``), a
    directory (``save_pretrained`` or torch.distributed.checkpoint) or an ``http(s)://`` URL.
    Raises :class:`WeightsLoadError` listing missing keys, unexpected keys and shape mismatches; on error the
    model is left untouched.
    """
    if isinstance(obj_or_path, Mapping):
        raw, source = obj_or_path, "the given state dict"
    else:
        raw, source = read_checkpoint(obj_or_path), str(obj_or_path)
    if not isinstance(raw, Mapping):
        raise WeightsLoadError(f"{source} holds a {type(raw).__name__}, not a state dict")
    flat = strip_wrapper_keys(flatten_state_dict(raw))
    if not flat:
        raise WeightsLoadError(f"{source} contains no tensors")
    backbone, prefix = select_backbone(flat)
    converted, layout = convert_to_dinov2(backbone)
    converted = _fit_to_model(converted, model)

    expected = model.state_dict()
    # Listed in model (resp. checkpoint) order, which reads better than an alphabetical blocks.1, blocks.10, ...
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in converted and converted[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"cannot load {source} into {_describe(model)}: detected layout {layout!r}"
            + (f" under prefix {prefix!r}" if prefix else "")
        ]
        if missing:
            lines.append(f"  missing keys {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches {_listing(mismatched)}")
        raise WeightsLoadError("\n".join(lines))
    model.load_state_dict(converted, strict=True)
    logger.info("loaded %s (layout %s%s)", source, layout, f", prefix {prefix!r}" if prefix else "")
    return layout
