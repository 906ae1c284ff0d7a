"""Hugging Face export: a ``save_pretrained``-style folder (``config.json`` + ``model.safetensors``) that
``transformers.Dinov2Model.from_pretrained`` (``Dinov2WithRegistersModel`` for a backbone with registers) loads.

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
from dinoscale.models.vit import DinoVisionTransformer, swiglu_hidden_features

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


def export_huggingface(model: DinoVisionTransformer, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``model`` as a Hugging Face folder (``config.json``, ``model.safetensors``); returns the files."""
    spec = backbone_spec(model)
    config = hf_config(spec)
    tensors = dinov2_to_hf(export_state_dict(model))
    folder = Path(folder)
    with staged_files(folder, FILES, overwrite) as staging:
        config.to_json_file(str(staging / "config.json"))
        # transformers refuses safetensors files without the "format" entry in their metadata
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    return [folder / name for name in FILES]
