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

A DINOv3 backbone (``dinoscale.models.vit_dinov3``) becomes timm's ``vit_*_patch16_dinov3`` (timm's ``Eva``
with DINOv3's RoPE), the inverse of :func:`dinoscale.hub.convert.timm_to_dinov3`: ``storage_tokens`` ->
``reg_token``, ``ls1/ls2.gamma`` -> ``gamma_1/2``, SwiGLU ``w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``, the qkv bias ->
``q_bias``/``v_bias`` (timm's key bias is a zero buffer). The released sizes get timm's names (the ``_qkvb``
variant when the q/v biases are not all zero: timm's plain models have none, as the released ViT-S/B/L/H+ whose
biases are zero); any other backbone the closest family (GELU MLP -> ``vit_small``, SwiGLU -> ``vit_small_plus``)
with every architecture argument in ``model_args``. RoPE needs no resizing, so features agree at every size.
Not exported: the RoPE periods (timm recomputes them from ``rope_temperature`` in float32; the README says so
when the backbone's differ, as the bf16-rounded periods of the official files do), the training-only RoPE
coordinate augmentations, ``mask_token`` and ``local_cls_norm``. RoPE by min/max periods or another coordinate
normalisation than ``separate``, an untied CLS norm, a LayerNorm eps other than 1e-5 and a non-zero key bias have
no timm ``model_args``: ExportError before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.export.backbone import BackboneSpec, ExportError, backbone_spec, export_state_dict
from dinoscale.export.output import staged_files
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer, SwiGLUFFN as DinoV3SwiGLUFFN

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
    return _hub_config(name, kwargs, spec.embed_dim, [spec.in_chans, spec.img_size, spec.img_size])


def _hub_config(name: str, kwargs: dict[str, Any], num_features: int, input_size: list[int]) -> dict[str, Any]:
    """timm's Hub ``config.json`` for a feature backbone (no classifier, CLS pooling) of either generation."""
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": "token",
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": input_size,
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


# ---------------------------------------------------------------------------------------------------- DINOv3

# (embed_dim, depth, num_heads, ffn_layer, ffn_hidden) -> timm's DINOv3 name (patch 16, 4 storage tokens)
_DINOV3_SIZES = {
    (384, 12, 6, "mlp", 1536): "vit_small_patch16_dinov3",
    (384, 12, 6, "swiglu", 1536): "vit_small_plus_patch16_dinov3",
    (768, 12, 12, "mlp", 3072): "vit_base_patch16_dinov3",
    (1024, 24, 16, "mlp", 4096): "vit_large_patch16_dinov3",
    (1280, 32, 20, "swiglu", 5120): "vit_huge_plus_patch16_dinov3",
    (4096, 40, 32, "swiglu", 8192): "vit_7b_patch16_dinov3",
}
_QKVB_VARIANTS = {name for name in _DINOV3_SIZES.values() if name != "vit_7b_patch16_dinov3"}
_DINOV3_EPS = 1e-5  # timm's vit_*_dinov3 LayerNorm (the releases' "layernormbf16")
_DINOV3_RENAMES = [
    (r"storage_tokens", "reg_token"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.gamma_1"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.gamma_2"),
    (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"blocks.\1.mlp.fc1_g.\2"),
    (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"blocks.\1.mlp.fc1_x.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]
_DINOV3_DROPPED = re.compile(r"rope_embed\.periods|mask_token|local_cls_norm\..*|blocks\.\d+\.attn\.qkv\.bias_mask")


def _effective_qkv_biases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.<i>.attn`` -> the qkv bias the block adds (``bias * bias_mask`` with a masked key bias)."""
    out = {}
    for key, bias in state_dict.items():
        if m := re.fullmatch(r"(blocks\.\d+\.attn)\.qkv\.bias", key):
            mask = state_dict.get(f"{m.group(1)}.qkv.bias_mask")
            out[m.group(1)] = bias if mask is None else bias * mask
    return out


def dinov3_to_timm(state_dict: dict[str, torch.Tensor], *, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Official DINOv3 layout -> timm ``vit_*_patch16_dinov3`` layout (see the module docstring). ``qkv_bias``:
    write the (effective) q and v biases as ``q_bias``/``v_bias``; otherwise they must be zero and are left out."""
    biases = _effective_qkv_biases(state_dict)
    out = {}
    for key, value in state_dict.items():
        if _DINOV3_DROPPED.fullmatch(key) or key.endswith(".attn.qkv.bias"):
            continue
        for pattern, replacement in _DINOV3_RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    for attn, bias in biases.items():
        q, k, v = bias.chunk(3)
        if not bias.is_meta and (k.any() or (not qkv_bias and (q.any() or v.any()))):
            raise ExportError(f"{attn}: timm's DINOv3 attention has no key bias (and q/v biases only with "
                              "qkv_bias=True); this backbone's is not zero")
        if qkv_bias:
            out[f"{attn}.q_bias"], out[f"{attn}.v_bias"] = q.contiguous(), v.contiguous()
    return out


def _dinov3_state_dict(model: DinoV3VisionTransformer) -> dict[str, torch.Tensor]:
    """The DINOv3 backbone's weights (official layout, float32, CPU) plus what timm's model always has: identity
    LayerScale and zero attention-output / FFN biases where the backbone has none."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}"
        for ls in ("ls1", "ls2"):
            state.setdefault(f"{prefix}.{ls}.gamma", torch.ones(dim))
        state.setdefault(f"{prefix}.attn.proj.bias", torch.zeros(dim))
        names = ("w1", "w2", "w3") if isinstance(block.mlp, DinoV3SwiGLUFFN) else ("fc1", "fc2")
        for name in names:
            weight = state[f"{prefix}.mlp.{name}.weight"]
            state.setdefault(f"{prefix}.mlp.{name}.bias", torch.zeros(weight.shape[0]))
    return state


def _dinov3_has_qkv_bias(model: DinoV3VisionTransformer) -> bool:
    """Whether the export needs timm's q/v bias parameters: the backbone's effective q/v biases are not all 0
    (a meta-device backbone, which has no values, counts as having them)."""
    biases = _effective_qkv_biases({k: v.detach() for k, v in model.state_dict().items()})
    if any(bias.is_meta for bias in biases.values()):
        return True
    return any(bias.chunk(3)[0].any() or bias.chunk(3)[2].any() for bias in biases.values())


def dinov3_timm_model(model: DinoV3VisionTransformer) -> tuple[str, dict[str, Any]]:
    """``(model_name, kwargs)`` for ``timm.create_model`` that build the DINOv3 backbone's architecture;
    ExportError for what timm's ``vit_*_dinov3`` arguments cannot express (see the module docstring)."""
    rope, block = model.rope_embed, model.blocks[0]
    if rope.base is None:
        raise ExportError("timm's DINOv3 models set RoPE by rope_temperature (a base); this backbone uses min/max "
                          "periods")
    if rope.normalize_coords != "separate":
        raise ExportError(f"timm's DINOv3 models normalise RoPE coordinates per axis ('separate'), this backbone by "
                          f"{rope.normalize_coords!r}")
    if model.cls_norm is not None:
        raise ExportError("timm's DINOv3 models have one final norm; this backbone unties the CLS and patch norms")
    if block.norm1.eps != _DINOV3_EPS:
        raise ExportError(f"timm's DINOv3 models use LayerNorm eps {_DINOV3_EPS}; this backbone {block.norm1.eps} "
                          "(norm_layer='layernormbf16' is the releases')")
    swiglu = isinstance(block.mlp, DinoV3SwiGLUFFN)
    hidden = block.mlp.w1.out_features if swiglu else block.mlp.fc1.out_features
    qkv_bias = _dinov3_has_qkv_bias(model)
    img_h, img_w = model.patch_embed.img_size
    # timm's named models already have dynamic_img_size, LayerScale and 4 register tokens; 'token' pooling makes
    # model(images) the normalised [CLS] token, as upstream DINOv3 (timm's default is 'avg')
    kwargs: dict[str, Any] = dict(img_size=img_h if img_h == img_w else [img_h, img_w], num_classes=0,
                                  global_pool="token")
    if model.patch_embed.in_chans != 3:
        kwargs["in_chans"] = model.patch_embed.in_chans
    if rope.base != 100:
        kwargs["rope_temperature"] = float(rope.base)
    name = _DINOV3_SIZES.get((model.embed_dim, model.n_blocks, model.num_heads, "swiglu" if swiglu else "mlp", hidden))
    if name is None or model.patch_size != 16 or model.n_storage_tokens != 4:
        name = "vit_small_plus_patch16_dinov3" if swiglu else "vit_small_patch16_dinov3"
        kwargs.update(patch_size=model.patch_size, embed_dim=model.embed_dim, depth=model.n_blocks,
                      num_heads=model.num_heads, num_reg_tokens=model.n_storage_tokens,
                      # timm's FFN width is int(embed_dim * mlp_ratio) (each SwiGLU input projection's, rounded
                      # up to swiglu_align_to; 1 keeps it, 0 would switch to timm's packed SwiGLU); the half step
                      # keeps the float product from rounding down
                      mlp_ratio=(hidden + 0.5) / model.embed_dim)
        if swiglu:
            kwargs["swiglu_align_to"] = 1
    if qkv_bias:
        if name in _QKVB_VARIANTS:
            name += "_qkvb"
        else:
            kwargs["qkv_bias"] = True
    return name, kwargs


def dinov3_timm_config(model: DinoV3VisionTransformer) -> dict[str, Any]:
    """``config.json`` in timm's Hub format for a DINOv3 backbone."""
    name, kwargs = dinov3_timm_model(model)
    img_h, img_w = model.patch_embed.img_size
    return _hub_config(name, kwargs, model.embed_dim, [model.patch_embed.in_chans, img_h, img_w])


def _rope_note(model: DinoV3VisionTransformer) -> str:
    """What the README says when timm's recomputed RoPE differs from the backbone's (else nothing)."""
    rope = model.rope_embed
    k = torch.arange(rope.periods.numel(), dtype=torch.float64)
    formula = float(rope.base) ** (4 * k / rope.head_dim)
    periods = rope.periods.detach().cpu().double()
    if rope.periods.dtype == torch.float32 and torch.allclose(periods, formula, rtol=1e-6, atol=0):
        return ""
    return ("\nThis backbone's RoPE periods differ from rope_temperature ** (4k / head_dim) in float32 (e.g. the "
            "bf16-rounded periods of the official DINOv3 files, or a bf16/fp16 RoPE): timm recomputes them, so its "
            "features differ slightly from the backbone's.")


def dinov3_readme(model: DinoV3VisionTransformer, folder: Path) -> str:
    """The README.txt of a DINOv3 export: the load snippets and what the outputs are."""
    name, kwargs = dinov3_timm_model(model)
    r = model.n_storage_tokens
    keyword_lines = "\n".join(f"        {key}={value!r}," for key, value in kwargs.items())
    generic = " with generic arguments" if "embed_dim" in kwargs else ""
    return f"""timm export of a dinoscale DINOv3 backbone ({name}{generic}).

Load with a timm that knows "local-dir:" (2025 on; it reads config.json and model.safetensors here):

    import timm
    model = timm.create_model("local-dir:{folder.resolve()}", pretrained=True).eval()

or, with a timm that has {name}:

    import timm
    model = timm.create_model(
        "{name}",
        pretrained=True,
        pretrained_cfg_overlay=dict(file="{(folder / 'model.safetensors').resolve()}"),
{keyword_lines}
    ).eval()

Features: tokens = model.forward_features(images)  # (B, 1 + {r} + N, {model.embed_dim}), after the final norm
    tokens[:, 0]      normalised CLS token   (dinoscale x_norm_clstoken; also model(images))
    tokens[:, 1:{1 + r}]    storage tokens         (dinoscale x_storage_tokens)
    tokens[:, {1 + r}:]     normalised patch tokens (dinoscale x_norm_patchtokens), row-major
Images: normalised with mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}; sides multiples of {model.patch_size}.
RoPE: any image size works, with no position embedding to resize.{_rope_note(model)}
"""


def export_timm(model: torch.nn.Module, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``model`` (a DINOv2-layout or a DINOv3 backbone) as a timm folder (``model.safetensors``,
    ``config.json``, ``README.txt``); ExportError before writing anything timm cannot build."""
    folder = Path(folder)
    if isinstance(model, DinoV3VisionTransformer):
        config = dinov3_timm_config(model)
        tensors = dinov3_to_timm(_dinov3_state_dict(model), qkv_bias=_dinov3_has_qkv_bias(model))
        text = dinov3_readme(model, folder)
    else:
        spec = backbone_spec(model)
        config, tensors, text = timm_config(spec), dinov2_to_timm(export_state_dict(model)), readme(spec, folder)
    with staged_files(folder, FILES, overwrite) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.txt").write_text(text)
    return [folder / name for name in FILES]
