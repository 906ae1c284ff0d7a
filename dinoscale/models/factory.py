"""The one place that turns an architecture name (or a ``model:`` config section) into a backbone.

``ARCHS`` holds the sizes of the ViT architectures; :func:`build_backbone` builds one from a name plus
keyword arguments, or from the ``model:`` section of a training config. Training, evaluation, the hub's
named models and the benchmarks all build their backbones here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinoscale.models.vit import DinoVisionTransformer

# Architecture name -> the DinoVisionTransformer arguments that define it (the rest keep their defaults).
ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    # DINOv2's giant: head dim 64 and a SwiGLU FFN
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4, ffn_layer="swiglufused"),
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


def backbone_kwargs(model_cfg: Mapping) -> dict[str, Any]:
    """The DinoVisionTransformer arguments a ``model:`` config section sets (all but ``arch``)."""
    kwargs = {arg: model_cfg[key] for key, arg in _CONFIG_ARGS.items()}
    kwargs.update({key: model_cfg[key] for key in _SIZE_OVERRIDES if model_cfg[key] is not None})
    return kwargs


def build_backbone(model: str | Mapping, **kwargs: Any) -> DinoVisionTransformer:
    """A ViT from an architecture name in ``ARCHS`` or from a ``model:`` config section.

    ``kwargs`` override the architecture's (or the config's) arguments, e.g. ``drop_path_rate=0.1`` for
    training, or ``depth=2`` for a fast test of the giant layout.
    """
    if isinstance(model, str):
        arch, params = model, {}
        if arch not in ARCHS:
            raise ValueError(f"unknown arch '{arch}'; choose one of {sorted(ARCHS)}")
    else:
        arch, params = model["arch"], backbone_kwargs(model)
        if arch not in ARCHS:
            raise ValueError(f"unknown model.arch '{arch}'; choose one of {sorted(ARCHS)}")
    return DinoVisionTransformer(**{**ARCHS[arch], **params, **kwargs})
