"""timm export: a folder with ``model.safetensors`` (timm's ``VisionTransformer`` names), ``config.json`` (the
model name, its keyword arguments and the pretrained config, in timm's Hub format) and ``README.txt`` (how to
load it), for ``timm.create_model``.

The model name is a ``vit_*_patch14[_reg4]_dinov2`` entry: the one with the backbone's exact architecture
when there is one, else the closest family (SwiGLU -> ``vit_giant...``, otherwise ``vit_small...``; registers
-> ``_reg4``) with every architecture argument given explicitly (a generic ``VisionTransformer``).

The inverse of :func:`dinoscale.hub.convert.timm_to_dinov2`: registers become ``reg_token``; SwiGLU's
``w12``/``w3`` become the packed ``fc1``/``fc2``. timm's register models add no position embedding to the
class token (``no_embed_class``), so the class slot of ``pos_embed`` is folded into ``cls_token`` (the sum the
blocks see is the same). timm has no mask token (used only by masked-image training); it is left out.

``forward_features`` returns ``[cls, registers, patches]`` after the final norm. With ``dynamic_img_size``
timm resizes the position embedding to the exact grid with antialiasing: away from ``img_size`` it agrees
with the backbone only for ``interpolate_offset=0, interpolate_antialias=True`` (:func:`interpolation_matches`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.export.backbone import BackboneSpec, backbone_spec, export_state_dict
from dinoscale.export.output import staged_files
from dinoscale.models.vit import DinoVisionTransformer

FILES = ("config.json", "model.safetensors", "README.txt")
_SWIGLU = re.compile(r"(blocks\.\d+\.mlp)\.(w12|w3)\.(weight|bias)")

# (embed_dim, depth, num_heads, ffn_layer, ffn_hidden) -> size in timm's dinov2 names (all patch 14)
_STANDARD_SIZES = {
    (384, 12, 6, "mlp", 1536): "small",
    (768, 12, 12, "mlp", 3072): "base",
    (1024, 24, 16, "mlp", 4096): "large",
    (1536, 40, 24, "swiglu", 4096): "giant",
}


def dinov2_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout -> timm ``VisionTransformer`` layout (see the module docstring)."""
    out = {}
    registers = "register_tokens" in state_dict
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif key == "pos_embed" and registers:
            out["pos_embed"] = value[:, 1:].contiguous()
        elif key == "cls_token" and registers:
            out["cls_token"] = value + state_dict["pos_embed"][:, :1]
        elif m := _SWIGLU.fullmatch(key):  # timm's packed SwiGLU keeps the plain MLP's names
            out[f"{m.group(1)}.{'fc1' if m.group(2) == 'w12' else 'fc2'}.{m.group(3)}"] = value
        else:
            out[key] = value
    return out


def interpolation_matches(spec: BackboneSpec) -> bool:
    """Whether timm (``dynamic_img_size``) resizes the position embedding as the backbone does (at every size)."""
    return spec.interpolate_offset == 0 and spec.interpolate_antialias


def timm_model(spec: BackboneSpec) -> tuple[str, dict[str, Any]]:
    """``(model_name, kwargs)`` for ``timm.create_model`` that build the backbone's architecture."""
    registers = "_reg4" if spec.num_register_tokens else ""
    kwargs: dict[str, Any] = dict(img_size=spec.img_size, dynamic_img_size=True, num_classes=0)
    if spec.in_chans != 3:
        kwargs["in_chans"] = spec.in_chans
    if not spec.qkv_bias:
        kwargs["qkv_bias"] = False
    key = (spec.embed_dim, spec.depth, spec.num_heads, spec.ffn_layer, spec.ffn_hidden)
    size = _STANDARD_SIZES.get(key)
    if size is not None and spec.patch_size == 14 and spec.num_register_tokens in (0, 4):
        return f"vit_{size}_patch14{registers}_dinov2", kwargs
    family = "giant" if spec.ffn_layer == "swiglu" else "small"
    # timm's FFN width is int(embed_dim * mlp_ratio), SwiGLU's two packed projections together; the half
    # step keeps the float product from rounding down.
    width = 2 * spec.ffn_hidden if spec.ffn_layer == "swiglu" else spec.ffn_hidden
    kwargs.update(
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=(width + 0.5) / spec.embed_dim,
        init_values=1.0,
    )
    if spec.num_register_tokens:
        kwargs["reg_tokens"] = spec.num_register_tokens
    return f"vit_{family}_patch14{registers}_dinov2", kwargs


def timm_config(spec: BackboneSpec) -> dict[str, Any]:
    """``config.json`` in timm's Hub format (``timm.create_model("local-dir:FOLDER")`` reads it)."""
    name, kwargs = timm_model(spec)
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "global_pool": "token",
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [spec.in_chans, spec.img_size, spec.img_size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def readme(spec: BackboneSpec, folder: Path) -> str:
    """The README.txt written next to the weights: the load snippets and what the outputs are."""
    name, kwargs = timm_model(spec)
    r = spec.num_register_tokens
    keyword_lines = "\n".join(f"        {key}={value!r}," for key, value in kwargs.items())
    size_note = (
        "The position embedding is resized like dinoscale's at every image size."
        if interpolation_matches(spec)
        else f"Away from {spec.img_size}x{spec.img_size} timm resizes the position embedding differently from "
        f"the dinoscale backbone (interpolate_offset={spec.interpolate_offset}, "
        f"interpolate_antialias={spec.interpolate_antialias}), so features differ slightly there."
    )
    generic = " with generic arguments" if "embed_dim" in kwargs else ""
    return f"""timm export of a dinoscale backbone ({name}{generic}).

Load with a timm that knows "local-dir:" (2025 on; it reads config.json and model.safetensors here):

    import timm
    model = timm.create_model("local-dir:{folder.resolve()}", pretrained=True).eval()

or, with any timm 1.x:

    import timm
    model = timm.create_model(
        "{name}",
        pretrained=True,
        pretrained_cfg_overlay=dict(file="{(folder / 'model.safetensors').resolve()}"),
{keyword_lines}
    ).eval()

Features: tokens = model.forward_features(images)  # (B, 1 + {r} + N, {spec.embed_dim}), after the final norm
    tokens[:, 0]      normalised CLS token   (dinoscale x_norm_clstoken)
    tokens[:, {1 + r}:]     normalised patch tokens (dinoscale x_norm_patchtokens), row-major
Images: normalised with mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}; sides multiples of {spec.patch_size}.
{size_note}
"""


def export_timm(model: DinoVisionTransformer, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``model`` as a timm folder (``model.safetensors``, ``config.json``, ``README.txt``)."""
    spec = backbone_spec(model)
    tensors = dinov2_to_timm(export_state_dict(model))
    folder = Path(folder)
    with staged_files(folder, FILES, overwrite) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(timm_config(spec), indent=2) + "\n")
        (staging / "README.txt").write_text(readme(spec, folder))
    return [folder / name for name in FILES]
