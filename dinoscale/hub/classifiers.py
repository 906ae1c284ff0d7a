"""The released DINOv2 ImageNet-1k linear classifiers: ``dinov2_vits14_lc``, ..., ``dinov2_vitg14_reg_lc``.

A :class:`LinearClassifier` is a named backbone (``dinoscale.hub.zoo``) and one linear layer over 1000 classes.
The layer reads what the released heads were trained on (DINOv2's linear evaluation): the final-norm CLS
token of each of the last ``layers`` blocks (1 or 4), then the mean of the last block's final-norm patch
tokens (registers excluded), for a backbone of width ``D`` and ``L`` blocks:

    logits = W [cls_{L-layers+1}; ...; cls_L; mean_i patch_{L,i}] + b,    W: (1000, (1 + layers) * D)

The constructors have upstream facebookresearch/dinov2's signature, ``(*, layers=4, pretrained=True,
weights="IMAGENET1K", **kwargs)``: with ``pretrained`` the released backbone and the released head of
``layers`` (``<model>_linear_head.pth`` / ``<model>_linear4_head.pth``), downloaded once into torch.hub's
cache; ``pretrained=False``: random weights. dinoscale adds: ``weights`` may also be a head file, URL or state
dict (upstream's head layout, an ``nn.Linear``'s ``weight`` and ``bias``), and ``backbone_weights`` (default
the release) takes what ``dinoscale.hub.load`` takes. The module's state dict has upstream's keys
(``backbone.*``, ``linear_head.weight``, ``linear_head.bias``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from enum import Enum

import torch
import torch.nn as nn

from dinoscale.hub.io import WeightsLoadError
from dinoscale.hub.loading import read_tensors
from dinoscale.hub.zoo import (
    LINEAR_HEAD_LAYERS,
    MODELS,
    Weights,
    WeightsArg,
    build_named,
    warn_random_weights,
    weights_source,
)
from dinoscale.models.factory import ARCHS
from dinoscale.models.vit import DinoVisionTransformer

NUM_CLASSES = 1000  # ImageNet-1k


class ClassifierWeights(Enum):
    """Upstream's name of the released linear heads (the data they were trained on): ``weights="IMAGENET1K"``."""

    IMAGENET1K = "IMAGENET1K"


class LinearClassifier(nn.Module):
    """``backbone`` and ``linear_head`` over the CLS tokens of its last ``layers`` blocks and the mean patch token.

    ``forward(images)`` -> logits ``(B, num_classes)``; ``head_input(images)`` -> what the head reads,
    ``(B, (1 + layers) * D)``.
    """

    def __init__(self, backbone: DinoVisionTransformer, linear_head: nn.Linear, layers: int) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if linear_head.in_features != (1 + layers) * backbone.embed_dim:
            raise ValueError(
                f"a head over {layers} block(s) of width {backbone.embed_dim} reads "
                f"{(1 + layers) * backbone.embed_dim} features, not {linear_head.in_features}"
            )
        self.backbone = backbone
        self.linear_head = linear_head
        self.layers = layers

    def head_input(self, images: torch.Tensor) -> torch.Tensor:
        """``[cls_{L-layers+1}; ...; cls_L; mean of the last block's patch tokens]``, all after the final norm."""
        outputs = self.backbone.get_intermediate_layers(images, n=self.layers, return_class_token=True, norm=True)
        class_tokens = [cls for _, cls in outputs]
        return torch.cat([*class_tokens, outputs[-1][0].mean(dim=1)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear_head(self.head_input(images))


def load_linear_head(head: nn.Linear, obj_or_path: Mapping | str | os.PathLike, *, layers: int) -> None:
    """Load a head file / URL / state dict of upstream's layout (``weight``, ``bias``) into ``head``, strictly.

    ``layers`` is only used to explain a width mismatch. Raises :class:`WeightsLoadError` naming the source,
    the keys and shapes expected and found; ``head`` is left untouched then.
    """
    found, source = read_tensors(obj_or_path)
    expected = head.state_dict()
    shapes = {k: tuple(v.shape) for k, v in found.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if shapes != want:
        message = f"cannot load {source} as a linear head over {layers} block(s): expected {want}, found {shapes}"
        width = head.in_features // (1 + layers)
        other = {(1 + n) * width: n for n in LINEAR_HEAD_LAYERS if n != layers}
        if len(shapes.get("weight", ())) == 2 and shapes["weight"][1] in other:
            message += f" (a head over {other[shapes['weight'][1]]} block(s): pass layers={other[shapes['weight'][1]]})"
        raise WeightsLoadError(message)
    head.load_state_dict(found, strict=True)


def build_classifier(
    name: str,
    layers: int,
    head_source: Mapping | str | os.PathLike | None,
    backbone_source: Mapping | str | os.PathLike | None,
    **kwargs,
) -> LinearClassifier:
    """The backbone ``name`` (``MODELS``) with ``backbone_source`` loaded and a head with ``head_source``
    loaded (None: random weights, said once per process); ``kwargs`` override the backbone's arguments."""
    spec = MODELS[name]
    release_head = isinstance(head_source, str) and head_source == spec.linear_head_url(layers)  # checks layers
    release_dim = ARCHS[spec.arch]["embed_dim"]
    if release_head and kwargs.get("embed_dim", release_dim) != release_dim:
        raise ValueError(
            f"{name}_lc: the released head reads width {release_dim}, not embed_dim={kwargs['embed_dim']}; "
            "pass pretrained=False or weights=<a head file>"
        )
    backbone = build_named(name, backbone_source, **kwargs)
    head = nn.Linear((1 + layers) * backbone.embed_dim, NUM_CLASSES)
    if head_source is None:
        warn_random_weights(f"{name}_lc", f"For the released head: dinoscale.hub.{name}_lc(layers={layers}).")
    else:
        load_linear_head(head, head_source, layers=layers)
    return LinearClassifier(backbone, head, layers)


def _classifier_constructor(name: str) -> Callable[..., LinearClassifier]:
    def constructor(
        *,
        layers: int = 4,
        pretrained: bool = True,
        weights: WeightsArg = ClassifierWeights.IMAGENET1K,
        backbone_weights: WeightsArg = Weights.LVD142M,
        **kwargs,
    ) -> LinearClassifier:
        spec = MODELS[name]
        head_source = weights_source(
            f"{name}_lc", weights, pretrained=pretrained, tags=(ClassifierWeights.IMAGENET1K.name,),
            release_url=spec.linear_head_url(layers),  # ValueError unless layers is 1 or 4
        )
        backbone_source = weights_source(
            name, backbone_weights, pretrained=pretrained, tags=(Weights.LVD142M.name,), release_url=spec.weights_url
        )
        return build_classifier(name, layers, head_source, backbone_source, **kwargs)

    constructor.__name__ = constructor.__qualname__ = f"{name}_lc"
    constructor.__doc__ = (
        f"Linear ImageNet-1k classifier (1 or 4 layers) on {MODELS[name].description}; upstream DINOv2's hub "
        "signature.\n\n``pretrained=True``: the released backbone and head, downloaded once into torch.hub's "
        "cache; ``pretrained=False``: random weights. ``weights``: ``\"IMAGENET1K\"`` / ``\"official\"`` (the "
        "released head), or a head file, URL or state dict (``weight``, ``bias``). ``backbone_weights``: what "
        "``dinoscale.hub.load`` takes (default the release). ``kwargs`` override the backbone's arguments."
    )
    return constructor


# The torch.hub entry points (hubconf.py), one per entry of MODELS.
dinov2_vits14_lc = _classifier_constructor("dinov2_vits14")
dinov2_vitb14_lc = _classifier_constructor("dinov2_vitb14")
dinov2_vitl14_lc = _classifier_constructor("dinov2_vitl14")
dinov2_vitg14_lc = _classifier_constructor("dinov2_vitg14")
dinov2_vits14_reg_lc = _classifier_constructor("dinov2_vits14_reg")
dinov2_vitb14_reg_lc = _classifier_constructor("dinov2_vitb14_reg")
dinov2_vitl14_reg_lc = _classifier_constructor("dinov2_vitl14_reg")
dinov2_vitg14_reg_lc = _classifier_constructor("dinov2_vitg14_reg")
