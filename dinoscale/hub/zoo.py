"""The named backbones: one table of the released DINOv2 models, their release hyper-parameters and weights.

``load(name, weights=None, **kwargs)`` builds a named backbone (``kwargs`` override the release's arguments)
and loads ``weights`` into it: a path, URL, state dict, ``"official"`` (the released weights) or None
(random initialisation, nothing is downloaded). ``dinov2_vits14(...)`` and its siblings are the same as
``load("dinov2_vits14", ...)``; ``hubconf.py`` exposes them to ``torch.hub.load``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dinoscale.hub.loading import load_state_dict_any
from dinoscale.models.factory import build_backbone
from dinoscale.models.vit import DinoVisionTransformer

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class NamedModel:
    """A released backbone: its architecture (``dinoscale.models.factory.ARCHS``), the arguments it was
    released with, where its weights are, and a one-line description."""

    arch: str
    kwargs: dict[str, Any]
    weights_url: str
    description: str


def _dinov2_release(size: str, arch: str, title: str, registers: bool) -> NamedModel:
    base = f"dinov2_vit{size}14"
    return NamedModel(
        arch=arch,
        kwargs=dict(
            img_size=518,
            patch_size=14,
            init_values=1.0,
            num_register_tokens=4 if registers else 0,
            # The register release resizes position embeddings to the exact grid with antialiasing; the original
            # release uses a scale factor with a +0.1 offset and no antialiasing.
            interpolate_antialias=registers,
            interpolate_offset=0.0 if registers else 0.1,
        ),
        weights_url=f"{DINOV2_BASE_URL}/{base}/{base}{'_reg4' if registers else ''}_pretrain.pth",
        description=f"DINOv2 {title}" + (" with 4 registers" if registers else ""),
    )


# size letter in the release's names -> (architecture, title)
_DINOV2_SIZES = {
    "s": ("vit_small", "ViT-S/14"),
    "b": ("vit_base", "ViT-B/14"),
    "l": ("vit_large", "ViT-L/14"),
    "g": ("vit_giant2", "ViT-g/14 (SwiGLU)"),
}

# name -> NamedModel, in the order dinov2_vits14, ..., dinov2_vitg14, dinov2_vits14_reg, ..., dinov2_vitg14_reg
MODELS: dict[str, NamedModel] = {
    f"dinov2_vit{size}14" + ("_reg" if registers else ""): _dinov2_release(size, arch, title, registers)
    for registers in (False, True)
    for size, (arch, title) in _DINOV2_SIZES.items()
}


def official_weights_url(name: str) -> str:
    """Download URL of the released DINOv2 backbone ``name`` (e.g. ``dinov2_vits14_reg``)."""
    if name not in MODELS:
        raise ValueError(f"no released DINOv2 weights named {name!r}")
    return MODELS[name].weights_url


def load(name: str, weights: str | os.PathLike | Mapping | None = None, **kwargs) -> DinoVisionTransformer:
    """Build the named backbone (see ``MODELS``) and optionally load ``weights`` into it.

    ``weights``: path, URL, state dict, ``"official"`` or None; ``kwargs`` override the release's arguments.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    spec = MODELS[name]
    model = build_backbone(spec.arch, **{**spec.kwargs, **kwargs})
    if weights is not None:
        load_state_dict_any(model, spec.weights_url if isinstance(weights, str) and weights == "official" else weights)
    return model


def _named_constructor(name: str) -> Callable[..., DinoVisionTransformer]:
    def constructor(*, weights=None, **kwargs) -> DinoVisionTransformer:
        return load(name, weights=weights, **kwargs)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (
        f"{MODELS[name].description} (release hyper-parameters). "
        '``weights``: path, URL, state dict, "official" or None.'
    )
    return constructor


# The torch.hub entry points (hubconf.py), one per entry of MODELS.
dinov2_vits14 = _named_constructor("dinov2_vits14")
dinov2_vitb14 = _named_constructor("dinov2_vitb14")
dinov2_vitl14 = _named_constructor("dinov2_vitl14")
dinov2_vitg14 = _named_constructor("dinov2_vitg14")
dinov2_vits14_reg = _named_constructor("dinov2_vits14_reg")
dinov2_vitb14_reg = _named_constructor("dinov2_vitb14_reg")
dinov2_vitl14_reg = _named_constructor("dinov2_vitl14_reg")
dinov2_vitg14_reg = _named_constructor("dinov2_vitg14_reg")
