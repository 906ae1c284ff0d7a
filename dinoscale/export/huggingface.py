"""Hugging Face export: a ``save_pretrained``-style folder (``config.json`` + ``model.safetensors``) that
``transformers.Dinov2Model.from_pretrained`` (``Dinov2WithRegistersModel`` for a backbone with registers) loads,
or, for a DINOv3 backbone (``dinoscale.models.vit_dinov3``), ``transformers.DINOv3ViTModel.from_pretrained``.

``last_hidden_state`` is ``[cls, registers, patches]`` after the final LayerNorm, so
``last_hidden_state[:, 0]`` (= ``pooler_output``) is our ``x_norm_clstoken`` and
``last_hidden_state[:, 1 + R:]`` our ``x_norm_patchtokens``. The weights are written under the names the
released checkpoints on the Hugging Face Hub use (``attention.attention.query``, ``mlp.weights_in``, ...),
the inverse of :func:`dinoscale.hub.convert.hf_to_dinov2`.

Away from ``img_size`` the outputs agree only if the backbone resizes its position embedding the way the
Hugging Face class does (:func:`interpolation_matches`): ``Dinov2Model`` resizes to the exact grid without
antialiasing, ``Dinov2WithRegistersModel`` with antialiasing; neither has a config field to change it, nor
the original release's ``interpolate_offset``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from dinoscale.export.backbone import BackboneSpec, ExportError, backbone_spec, export_state_dict
from dinoscale.export.output import staged_files
from dinoscale.hub.convert import dinov3_to_hf
from dinoscale.hub.io import WeightsLoadError
from dinoscale.models.vit import DinoVisionTransformer, swiglu_hidden_features
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer, SwiGLUFFN as DinoV3SwiGLUFFN

FILES = ("config.json", "model.safetensors")

# official name -> Hugging Face name (saved layout); q/k/v are split separately.
_RENAMES = [
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"register_tokens", "embeddings.register_tokens"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"encoder.layer.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"encoder.layer.\1.layer_scale1.lambda1"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"encoder.layer.\1.layer_scale2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"encoder.layer.\1.mlp.weights_in.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"encoder.layer.\1.mlp.weights_out.\2"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def dinov2_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout -> Hugging Face ``Dinov2Model`` saved layout (fused ``qkv`` split into query/key/value)."""
    out = {}
    for key, value in state_dict.items():
        if m := _QKV.fullmatch(key):
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{name}.{m.group(2)}"] = part.contiguous()
            continue
        for pattern, replacement in _RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise ExportError(f"no Hugging Face name for parameter {key!r}")
    return out


def interpolation_matches(spec: BackboneSpec) -> bool:
    """Whether the Hugging Face class resizes the position embedding as the backbone does (at every size)."""
    return spec.interpolate_offset == 0 and spec.interpolate_antialias == (spec.num_register_tokens > 0)


def _mlp_ratio(spec: BackboneSpec) -> int:
    """The integer ``mlp_ratio`` (Dinov2Config requires an int) that gives the backbone's FFN width."""
    for ratio in range(1, 65):
        width = int(spec.embed_dim * ratio)
        if (swiglu_hidden_features(width) if spec.ffn_layer == "swiglu" else width) == spec.ffn_hidden:
            return ratio
    raise ExportError(
        f"Hugging Face's Dinov2Config takes an integer mlp_ratio; no integer gives this backbone's "
        f"{spec.ffn_layer} width {spec.ffn_hidden} for embed_dim {spec.embed_dim}"
    )


def hf_config(spec: BackboneSpec):
    """The ``transformers`` config of the backbone: Dinov2Config, or Dinov2WithRegistersConfig with registers."""
    try:  # transformers is optional, needed only for this target
        import transformers
    except ImportError as exc:
        raise ExportError(f"the Hugging Face export needs transformers (pip install transformers): {exc}") from exc

    args = dict(
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        mlp_ratio=_mlp_ratio(spec),
        image_size=spec.img_size,
        patch_size=spec.patch_size,
        num_channels=spec.in_chans,
        qkv_bias=spec.qkv_bias,
        use_swiglu_ffn=spec.ffn_layer == "swiglu",
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        drop_path_rate=0.0,
    )
    if spec.num_register_tokens:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=spec.num_register_tokens, **args)
        config.architectures = ["Dinov2WithRegistersModel"]
    else:
        config = transformers.Dinov2Config(**args)
        config.architectures = ["Dinov2Model"]
    return config


def dinov3_hf_config(model: DinoV3VisionTransformer):
    """The ``transformers.DINOv3ViTConfig`` of a DINOv3 backbone; ExportError for what the class cannot express
    (RoPE periods given as min/max instead of a base, another coordinate normalisation, an untied CLS norm)."""
    try:
        import transformers
    except ImportError as exc:
        raise ExportError(f"the Hugging Face export needs transformers (pip install transformers): {exc}") from exc
    rope = model.rope_embed
    if rope.base is None:
        raise ExportError("DINOv3ViTConfig sets RoPE by rope_theta (a base); this backbone uses min/max periods")
    if rope.normalize_coords != "separate":
        raise ExportError(f"DINOv3ViTModel normalises RoPE coordinates per axis ('separate'), this backbone by "
                          f"{rope.normalize_coords!r}")
    if model.cls_norm is not None:
        raise ExportError("DINOv3ViTModel has one final norm; this backbone unties the CLS and patch norms")
    block = model.blocks[0]
    qkv, mlp = block.attn.qkv, block.mlp
    gated = isinstance(mlp, DinoV3SwiGLUFFN)
    masked_key_bias = getattr(qkv, "bias_mask", None) is not None
    img_h, img_w = model.patch_embed.img_size
    config = transformers.DINOv3ViTConfig(
        image_size=img_h, patch_size=model.patch_size, num_channels=model.patch_embed.in_chans,
        hidden_size=model.embed_dim, num_hidden_layers=model.n_blocks, num_attention_heads=model.num_heads,
        intermediate_size=(mlp.w1 if gated else mlp.fc1).out_features, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", layer_norm_eps=block.norm1.eps, layerscale_value=1.0,
        num_register_tokens=model.n_storage_tokens, rope_theta=float(rope.base),
        query_bias=qkv.bias is not None, key_bias=qkv.bias is not None and not masked_key_bias,
        value_bias=qkv.bias is not None, proj_bias=block.attn.proj.bias is not None,
        mlp_bias=(mlp.w3 if gated else mlp.fc2).bias is not None, drop_path_rate=0.0,
        pos_embed_shift=rope.shift_coords, pos_embed_jitter=rope.jitter_coords, pos_embed_rescale=rope.rescale_coords,
    )
    config.architectures = ["DINOv3ViTModel"]
    return config


def dinov3_export_state_dict(model: DinoV3VisionTransformer) -> dict[str, torch.Tensor]:
    """The DINOv3 backbone's weights in the Hugging Face layout (float32, CPU), with identity LayerScale where the
    backbone has none (``DINOv3ViTModel`` always has it)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    for i in range(model.n_blocks):
        for ls in ("ls1", "ls2"):
            state.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(model.embed_dim))
    try:
        return dinov3_to_hf(state)
    except WeightsLoadError as exc:
        raise ExportError(str(exc)) from exc


def export_huggingface(model: torch.nn.Module, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``model`` as a Hugging Face folder (``config.json``, ``model.safetensors``); returns the files."""
    if isinstance(model, DinoV3VisionTransformer):
        config, tensors = dinov3_hf_config(model), dinov3_export_state_dict(model)
    else:
        config, tensors = hf_config(backbone_spec(model)), dinov2_to_hf(export_state_dict(model))
    folder = Path(folder)
    with staged_files(folder, FILES, overwrite) as staging:
        config.to_json_file(str(staging / "config.json"))
        # transformers refuses safetensors files without the "format" entry in their metadata
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    return [folder / name for name in FILES]
