"""The one place that turns an architecture name (or a ``model:`` config section) into a backbone.

``ARCHS`` holds the sizes of the DINOv2-layout ViT architectures (``DinoVisionTransformer``), ``DINOV3_ARCHS``
the released DINOv3 architectures (``DinoV3VisionTransformer``, every argument of the release: sizes, FFN,
RoPE, storage tokens, LayerScale, norms); :func:`build_backbone` builds one from a name plus keyword
arguments, or from the ``model:`` section of a training config. Training, evaluation, the hub's named models
and the benchmarks all build their backbones here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

# Architecture name -> the DinoVisionTransformer arguments that define it (the rest keep their defaults).
ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    # DINOv2's giant: head dim 64 and a SwiGLU FFN
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4, ffn_layer="swiglufused"),
}

# What every DINOv3 release shares (facebookresearch/dinov3, dinov3/hub/backbones.py): patch 16, RoPE with base
# 100, separate coordinate normalisation and a rescale augmentation of 2 (training only) computed in fp32, 4
# storage tokens, LayerScale 1e-5, LayerNorm eps 1e-5, the masked key bias.
_DINOV3_RELEASE = dict(
    patch_size=16,
    pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2.0,
    pos_embed_rope_dtype="fp32",
    qkv_bias=True,
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    n_storage_tokens=4,
    mask_k_bias=True,
)

# Architecture name (the release's hub name) -> every DinoV3VisionTransformer argument of the release.
DINOV3_ARCHS: dict[str, dict[str, Any]] = {
    "dinov3_vits16": dict(_DINOV3_RELEASE, embed_dim=384, depth=12, num_heads=6, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vits16plus": dict(_DINOV3_RELEASE, embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
    "dinov3_vitb16": dict(_DINOV3_RELEASE, embed_dim=768, depth=12, num_heads=12, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vitl16": dict(_DINOV3_RELEASE, embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vitl16plus": dict(
        _DINOV3_RELEASE, embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6, ffn_layer="swiglu"
    ),
    "dinov3_vith16plus": dict(
        _DINOV3_RELEASE, embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6, ffn_layer="swiglu"
    ),
    # The 7B: no qkv bias (so no bias_mask either), SwiGLU width rounded to 64, and the local crops' own class
    # norm from its training (held in the checkpoint, unused in eval).
    "dinov3_vit7b16": dict(
        _DINOV3_RELEASE,
        embed_dim=4096,
        depth=40,
        num_heads=32,
        ffn_ratio=3,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
}

# ``model:`` config key -> DinoVisionTransformer argument, for the keys that are always set.
_CONFIG_ARGS = {
    "patch_size": "patch_size",
    "img_size": "img_size",
    "mlp_ratio": "mlp_ratio",
    "num_register_tokens": "num_register_tokens",
    "layerscale": "init_values",
    "ffn_layer": "ffn_layer",
    "qkv_bias": "qkv_bias",
    "proj_bias": "proj_bias",
    "ffn_bias": "ffn_bias",
    "drop_path_uniform": "drop_path_uniform",
    "interpolate_antialias": "interpolate_antialias",
    "interpolate_offset": "interpolate_offset",
    "attn_backend": "attn_backend",
}
# ``model:`` keys that override the architecture's size when set (small runs and tests).
_SIZE_OVERRIDES = ("embed_dim", "depth", "num_heads")
# The ``model:`` keys a DINOv3 architecture takes from the config; the rest of its architecture (FFN, storage
# tokens, LayerScale, biases, RoPE) is the release's, whatever the DINOv2-oriented keys say. ``patch_size`` is
# taken as a size (default.yaml's 16 is every release's; small images, e.g. Fashion-MNIST, need a smaller one).
_DINOV3_CONFIG_ARGS = {"img_size": "img_size", "patch_size": "patch_size", "drop_path_uniform": "drop_path_uniform",
                       "attn_backend": "attn_backend"}


def backbone_kwargs(model_cfg: Mapping) -> dict[str, Any]:
    """The backbone arguments a ``model:`` config section sets (all but ``arch``): for a DINOv3 architecture
    only ``img_size``, ``patch_size``, ``drop_path_uniform``, ``attn_backend`` and the size overrides."""
    args = _DINOV3_CONFIG_ARGS if model_cfg["arch"] in DINOV3_ARCHS else _CONFIG_ARGS
    kwargs = {arg: model_cfg[key] for key, arg in args.items()}
    kwargs.update({key: model_cfg[key] for key in _SIZE_OVERRIDES if model_cfg[key] is not None})
    return kwargs


def arch_names() -> list[str]:
    """Every architecture name ``build_backbone`` accepts: the DINOv2-layout ones, then the DINOv3 releases."""
    return sorted(ARCHS) + sorted(DINOV3_ARCHS)


def build_backbone(model: str | Mapping, **kwargs: Any) -> DinoVisionTransformer | DinoV3VisionTransformer:
    """A ViT from an architecture name in ``ARCHS`` / ``DINOV3_ARCHS`` or from a ``model:`` config section.

    ``kwargs`` override the architecture's (or the config's) arguments, e.g. ``drop_path_rate=0.1`` for
    training, or ``depth=2`` for a fast test of the giant layout.
    """
    if isinstance(model, str):
        arch, params = model, {}
        if arch not in ARCHS and arch not in DINOV3_ARCHS:
            raise ValueError(f"unknown arch '{arch}'; choose one of {arch_names()}")
    else:
        arch = model["arch"]
        if arch not in ARCHS and arch not in DINOV3_ARCHS:
            raise ValueError(f"unknown model.arch '{arch}'; choose one of {arch_names()}")
        params = backbone_kwargs(model)
    if arch in DINOV3_ARCHS:
        return DinoV3VisionTransformer(**{**DINOV3_ARCHS[arch], **params, **kwargs})
    return DinoVisionTransformer(**{**ARCHS[arch], **params, **kwargs})
