"""``load_state_dict_any``: backbone weights of any supported layout into a model, strictly.

A checkpoint (file, directory, URL or in-memory dict) is read (``dinoscale.hub.io``), its backbone found and
converted to the official layout (``dinoscale.hub.convert``), fitted to the model (position embedding of
another grid size, absent mask token) and loaded with ``strict=True``. On any mismatch nothing is loaded and
:class:`~dinoscale.hub.io.WeightsLoadError` lists the missing and unexpected keys and the shape mismatches.

The position-embedding interpolation follows the source of the weights (``interpolation="source"``, the
default): weights in timm's or Hugging Face's layout switch the model to what that library does at other image
sizes (:func:`source_interpolation`), so the model's features equal the library's at every size; the official
layout keeps the model's own setting. ``interpolation="model"`` always keeps the model's (training does: its
config decides, for the student and the teacher alike). The setting is the model's ``interpolate_offset`` /
``interpolate_antialias``; it is not part of the state dict.

A DINOv3 model (``DinoV3VisionTransformer``) reads the official DINOv3, Hugging Face ``DINOv3ViTModel`` and
timm ``vit_*_patch16_dinov3`` layouts (``convert.convert_to_dinov3``); it has no position embedding to
interpolate (RoPE). What those libraries do not save is taken from the model: the RoPE periods and the key-bias
mask (fixed by the architecture), the training-only ``mask_token`` and ``local_cls_norm``, and a zero qkv bias
where the weights have none.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch

from dinoscale.hub.convert import (
    convert_to_dinov2,
    convert_to_dinov3,
    flatten_state_dict,
    is_square,
    select_backbone,
    strip_wrapper_keys,
)
from dinoscale.hub.io import MAX_LISTED, WeightsLoadError, read_checkpoint
from dinoscale.models.vit import DinoVisionTransformer, resample_pos_embed
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

logger = logging.getLogger(__name__)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"({len(items)}): {shown}{more}"


# ``interpolation=`` values of load_state_dict_any
INTERPOLATION_CHOICES = ("source", "model")
_LOGGED_SWITCHES: set[tuple] = set()  # interpolation switches already logged by this process


def source_interpolation(layout: str, state_dict: Mapping[str, torch.Tensor]) -> tuple[float, bool] | None:
    """``(interpolate_offset, interpolate_antialias)`` of the library weights of ``layout`` come from.

    Both libraries resize the position grid bicubically to the exact target grid (offset 0): timm
    (``resample_abs_pos_embed``) with antialiasing, register models or not; Hugging Face ``Dinov2Model``
    without, ``Dinov2WithRegistersModel`` (recognised by its ``register_tokens``, present even when empty)
    with. None for the official layout: the model's own setting stays (the named models carry the release's).
    ``state_dict`` is the converted (official-layout) one.
    """
    if layout == "timm":
        return 0.0, True
    if layout == "huggingface":
        return 0.0, "register_tokens" in state_dict
    return None


def _fit_to_model(
    state_dict: dict[str, torch.Tensor], model: DinoVisionTransformer, offset: float, antialias: bool
) -> dict[str, torch.Tensor]:
    """Interpolate a position embedding of another grid size; supply the mask token if absent.

    ``offset`` / ``antialias``: the interpolation the loaded model will use.
    """
    target = model.state_dict()
    pos_embed = state_dict.get("pos_embed")
    want = target["pos_embed"].shape
    if pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape != want and pos_embed.shape[2] == want[2]:
        if is_square(pos_embed.shape[1] - 1) and is_square(want[1] - 1):
            side = math.isqrt(want[1] - 1)
            # Resample the way the loaded model itself would for an image of its img_size, so it reproduces
            # the checkpoint's model at that input size.
            state_dict["pos_embed"] = resample_pos_embed(
                pos_embed, (side, side), interpolate_offset=offset, interpolate_antialias=antialias
            )
    if "mask_token" not in state_dict:
        # timm checkpoints have none; it only matters for masked-image training.
        state_dict["mask_token"] = target["mask_token"].detach().clone()
    registers = state_dict.get("register_tokens")
    if registers is not None and registers.numel() == 0 and "register_tokens" not in target:
        del state_dict["register_tokens"]  # Dinov2WithRegistersModel with 0 registers keeps an empty tensor
    return state_dict


def _is_fixed_or_training_only(key: str) -> bool:
    """DINOv3 entries the libraries other than the official one do not save: the RoPE periods and the key-bias
    mask (functions of the architecture), the mask token and the local crops' class norm (training only)."""
    return (
        key in ("rope_embed.periods", "mask_token")
        or key.endswith(".attn.qkv.bias_mask")
        or key.startswith("local_cls_norm.")
    )


def _fit_to_dinov3_model(
    state_dict: dict[str, torch.Tensor], model: DinoV3VisionTransformer
) -> dict[str, torch.Tensor]:
    """Supply what a timm / Hugging Face DINOv3 state dict lacks from the model: see the module docstring."""
    supplied = []
    for key, value in model.state_dict().items():
        if key in state_dict:
            continue
        if _is_fixed_or_training_only(key):
            state_dict[key] = value.detach().clone()
        elif key.endswith(".attn.qkv.bias") and key[: -len("bias")] + "weight" in state_dict:
            state_dict[key] = torch.zeros_like(value)  # weights without a qkv bias: the same as a zero bias
        else:
            continue
        supplied.append(key)
    if supplied:
        logger.info("taken from the model (not in the weights): %s", _listing(supplied))
    return state_dict


def _follow_interpolation(model: DinoVisionTransformer, layout: str, offset: float, antialias: bool) -> None:
    """Set the model's position-embedding interpolation; the first switch of each kind is logged."""
    before = (model.interpolate_offset, model.interpolate_antialias)
    model.interpolate_offset, model.interpolate_antialias = offset, antialias
    if before != (offset, antialias) and (layout, before) not in _LOGGED_SWITCHES:
        _LOGGED_SWITCHES.add((layout, before))
        logger.info(
            "position-embedding interpolation follows the %s weights: bicubic to the exact grid, antialias=%s "
            "(was interpolate_offset=%s, interpolate_antialias=%s); load with interpolation='model' to keep it",
            layout, antialias, *before,
        )


def describe_model(model: torch.nn.Module) -> str:
    """The sizes that decide which weights fit a backbone, for error messages."""
    if isinstance(model, DinoV3VisionTransformer):
        return (
            f"DinoV3VisionTransformer(embed_dim={model.embed_dim}, depth={model.n_blocks}, "
            f"num_heads={model.num_heads}, patch_size={model.patch_size}, "
            f"n_storage_tokens={model.n_storage_tokens}, ffn={type(model.blocks[0].mlp).__name__})"
        )
    if isinstance(model, DinoVisionTransformer):
        return (
            f"DinoVisionTransformer(embed_dim={model.embed_dim}, depth={model.n_blocks}, "
            f"num_heads={model.num_heads}, patch_size={model.patch_size}, "
            f"num_register_tokens={model.num_register_tokens}, ffn={type(model.blocks[0].mlp).__name__})"
        )
    return type(model).__name__


def read_tensors(obj_or_path: Mapping | str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a state dict, file, directory or URL as one flat dict without wrapper prefixes, and a
    description of the source for messages. WeightsLoadError if it holds no tensors."""
    if isinstance(obj_or_path, Mapping):
        raw, source = obj_or_path, "the given state dict"
    else:
        raw, source = read_checkpoint(obj_or_path), str(obj_or_path)
    if not isinstance(raw, Mapping):
        raise WeightsLoadError(f"{source} holds a {type(raw).__name__}, not a state dict")
    flat = strip_wrapper_keys(flatten_state_dict(raw))
    if not flat:
        raise WeightsLoadError(f"{source} contains no tensors")
    return flat, source


def load_state_dict_any(
    model: torch.nn.Module, obj_or_path: Mapping | str | os.PathLike, *, interpolation: str = "source"
) -> str:
    """Load backbone weights of any supported layout into ``model`` strictly; returns the detected layout.

    ``obj_or_path``: a state dict or checkpoint dict, a file (``.pth``/``.pt``/``.bin``/``.safetensors``), a
    directory (``save_pretrained`` or torch.distributed.checkpoint) or an ``http(s)://`` URL (cached by
    torch.hub). ``interpolation``: ``"source"`` sets the model's position-embedding interpolation to that of
    the library the weights come from (:func:`source_interpolation`; the official layout keeps the model's),
    ``"model"`` keeps the model's. Raises :class:`WeightsLoadError` listing missing keys, unexpected keys and
    shape mismatches; on error the model is left untouched.
    """
    if interpolation not in INTERPOLATION_CHOICES:
        raise ValueError(f"interpolation must be one of {INTERPOLATION_CHOICES}, got {interpolation!r}")
    flat, source = read_tensors(obj_or_path)
    backbone, prefix = select_backbone(flat)
    follow = None
    if isinstance(model, DinoV3VisionTransformer):  # RoPE: nothing to interpolate
        converted, layout = convert_to_dinov3(backbone)
        converted = _fit_to_dinov3_model(converted, model)
    else:
        converted, layout = convert_to_dinov2(backbone)
        follow = source_interpolation(layout, converted) if interpolation == "source" else None
        offset, antialias = follow or (model.interpolate_offset, model.interpolate_antialias)
        converted = _fit_to_model(converted, model, offset, antialias)

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
            f"cannot load {source} into {describe_model(model)}: detected layout {layout!r}"
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
    if follow is not None:
        _follow_interpolation(model, layout, offset, antialias)
    logger.info("loaded %s (layout %s%s)", source, layout, f", prefix {prefix!r}" if prefix else "")
    return layout
