"""The named backbones: tables of the released DINOv2 and DINOv3 models, their release hyper-parameters and weights.

Two ways to build one:

* ``load(name, weights=None, **kwargs)``, dinoscale's: ``weights`` is a path, URL, state dict (any layout
  ``load_state_dict_any`` reads), ``"official"`` (or upstream's tag ``"LVD142M"``) for the released weights,
  or None: random initialisation, nothing downloaded, and a warning (once per process) saying how to get the
  released weights.
* ``dinov2_vits14(*, pretrained=True, weights="LVD142M", **kwargs)`` and siblings, with the signature of
  upstream facebookresearch/dinov2's hub: the released weights unless ``pretrained=False`` (random
  initialisation); ``weights`` also takes everything ``load`` takes. ``hubconf.py`` exposes them to torch.hub.

``kwargs`` override the release's arguments. The released weights fit the release architecture only: with
other architecture arguments (depth, embed_dim, ...) they are refused before anything is downloaded; img_size
and the interpolation arguments may change (the position embedding is resampled).

Released weights are downloaded once into torch.hub's cache, ``torch.hub.get_dir()/checkpoints/<file>``
(``dinoscale.hub.io.url_cache_path``); a file found there is used without network. Without network and
without the file, one ``WeightsLoadError`` names the URL and the path to put the file at.

DINOv3 (``DINOV3_MODELS``: ``dinov3_vits16``, ``dinov3_vits16plus``, ``dinov3_vitb16``, ``dinov3_vitl16``,
``dinov3_vitl16plus``, ``dinov3_vith16plus``, ``dinov3_vit7b16``) works the same way, with upstream DINOv3's
signature (``weights="LVD1689M"`` or ``"SAT493M"``), except that Meta hands its weights out through signed URLs
only: the released weights are the file of the release's name in torch.hub's cache (where upstream's hub puts
it too), and without it one ``WeightsLoadError`` says where to request it and where to put it. Weights in the
official, Hugging Face or timm layout load from a path or state dict (``weights=...``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from dinoscale.hub.io import WeightsLoadError, url_cache_path
from dinoscale.hub.loading import describe_model, load_state_dict_any, read_tensors
from dinoscale.models.factory import DINOV3_ARCHS, build_backbone
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

logger = logging.getLogger(__name__)

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
OFFICIAL = "official"  # dinoscale's name for "the released weights", whatever the model
LINEAR_HEAD_LAYERS = (1, 4)  # the released linear heads read the CLS tokens of the last 1 or 4 blocks


class Weights(Enum):
    """Upstream's name of the released backbone weights (the pretraining data): ``weights="LVD142M"``."""

    LVD142M = "LVD142M"


WeightsArg = str | os.PathLike | Mapping | Enum | None


@dataclass(frozen=True)
class NamedModel:
    """A released backbone: its architecture (``dinoscale.models.factory.ARCHS``), the arguments it was
    released with, the common start of its files' URLs and a one-line description."""

    arch: str
    kwargs: dict[str, Any]
    url_stem: str  # e.g. https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4
    description: str

    @property
    def weights_url(self) -> str:
        """The released backbone weights."""
        return f"{self.url_stem}_pretrain.pth"

    def linear_head_url(self, layers: int) -> str:
        """The released ImageNet-1k linear head reading the last ``layers`` blocks (1 or 4)."""
        if layers not in LINEAR_HEAD_LAYERS:
            raise ValueError(f"the released linear heads read {LINEAR_HEAD_LAYERS} blocks, not layers={layers}")
        return f"{self.url_stem}_linear{'4' if layers == 4 else ''}_head.pth"


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
        url_stem=f"{DINOV2_BASE_URL}/{base}/{base}{'_reg4' if registers else ''}",
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


def named_model(name: str) -> NamedModel:
    """The entry of ``MODELS`` called ``name``; ValueError listing the names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS) + sorted(DINOV3_MODELS)}")
    return MODELS[name]


def official_weights_url(name: str) -> str:
    """Download URL of the released DINOv2 backbone ``name`` (e.g. ``dinov2_vits14_reg``)."""
    if name not in MODELS:
        raise ValueError(f"no released DINOv2 weights named {name!r}")
    return MODELS[name].weights_url


def _tag(weights: WeightsArg) -> str | None:
    """The release tag ``weights`` spells (a string or an Enum member, upstream's included), else None."""
    if isinstance(weights, Enum):
        return weights.name
    return weights if isinstance(weights, str) else None


def weights_source(
    name: str, weights: WeightsArg, *, pretrained: bool, tags: tuple[str, ...], release_url: str
) -> str | os.PathLike | Mapping | None:
    """What a named model loads: ``release_url``, the given path / URL / state dict, or None (random weights).

    ``weights`` naming the release (``"official"`` or one of ``tags``, as a string or Enum member) means
    ``release_url`` when ``pretrained``, random weights otherwise. None means random weights. Anything else
    is loaded as given, and contradicts ``pretrained=False`` (ValueError). A string that is neither a URL nor
    an existing path is refused first, before a model is built (FileNotFoundError naming the accepted tags).
    """
    accepted = (*tags, OFFICIAL)
    tag = _tag(weights)
    if tag in accepted:
        return release_url if pretrained else None
    if weights is None:
        return None
    if isinstance(weights, Enum):
        raise ValueError(f"{name}: weights={weights} is not one of {accepted}")
    if isinstance(weights, (str, os.PathLike)):
        text = str(weights)
        if not text.startswith(("http://", "https://")) and not Path(text).expanduser().exists():
            raise FileNotFoundError(
                f"{name}: weights={text!r} is not an existing file or directory, an http(s) URL, nor one of "
                f"{accepted} (the released weights)"
            )
    if not pretrained:
        raise ValueError(
            f"{name}: pretrained=False asks for random weights but weights={weights!r:.200} was given; "
            "drop pretrained=False to load them"
        )
    return weights


_RANDOM_WEIGHTS_SAID: set[str] = set()  # not empty once this process said that a named model has random weights


def warn_random_weights(name: str, how: str) -> None:
    """Say, once per process, that the named model ``name`` has random weights and ``how`` to get the released."""
    if _RANDOM_WEIGHTS_SAID:
        return
    _RANDOM_WEIGHTS_SAID.add(name)
    logger.warning("%s has random weights (no weights were loaded). %s (Said once per process.)", name, how)


def _how_to_get_released(name: str) -> str:
    url = MODELS[name].weights_url
    return (
        f"For the released weights: dinoscale.hub.{name}() or torch.hub.load(<repo>, {name!r}) "
        f"(pretrained=True), or dinoscale.hub.load({name!r}, weights='official'); they are downloaded from "
        f"{url} to {url_cache_path(url)}."
    )


def check_fits_release(name: str, **kwargs) -> None:
    """ValueError unless the release ``name`` built with ``kwargs`` has the release's parameter shapes (the
    position embedding aside: it is resampled to any img_size). Checked before the released weights are
    downloaded, on the meta device (nothing allocated)."""
    spec = MODELS[name]
    with torch.device("meta"):
        release = build_backbone(spec.arch, **spec.kwargs)
        requested = build_backbone(spec.arch, **{**spec.kwargs, **kwargs})
    want = {k: tuple(v.shape) for k, v in release.state_dict().items() if k != "pos_embed"}
    have = {k: tuple(v.shape) for k, v in requested.state_dict().items() if k != "pos_embed"}
    if want != have:
        raise ValueError(
            f"{name}: the released weights fit {describe_model(release)}, not {describe_model(requested)}; "
            "with other architecture arguments pass pretrained=False (random weights) or weights=<a checkpoint>"
        )


def build_named(name: str, source: str | os.PathLike | Mapping | None, **kwargs) -> DinoVisionTransformer:
    """The backbone ``name`` with ``kwargs`` overriding the release's arguments, ``source`` loaded into it
    (None: random weights, said once per process)."""
    spec = named_model(name)
    # Upstream's block_chunks only groups the blocks (FSDP wrapping); chunked checkpoints load either way.
    kwargs.pop("block_chunks", None)
    if isinstance(source, str) and source == spec.weights_url:
        check_fits_release(name, **kwargs)
    model = build_backbone(spec.arch, **{**spec.kwargs, **kwargs})
    if source is None:
        warn_random_weights(name, _how_to_get_released(name))
    else:
        load_state_dict_any(model, source)
    return model


def load(name: str, weights: WeightsArg = None, **kwargs) -> DinoVisionTransformer | DinoV3VisionTransformer:
    """Build the named backbone (see ``MODELS`` and ``DINOV3_MODELS``) and load ``weights`` into it.

    ``weights``: path, URL, state dict, ``"official"`` / ``"LVD142M"`` (DINOv2) / ``"LVD1689M"``, ``"SAT493M"``
    (DINOv3) for the released weights, or None (random weights, said once per process); ``kwargs`` override the
    release's arguments.
    """
    if name in DINOV3_MODELS:
        return build_dinov3(name, dinov3_weights_source(name, weights, pretrained=True), **kwargs)
    spec = named_model(name)
    source = weights_source(name, weights, pretrained=True, tags=(Weights.LVD142M.name,), release_url=spec.weights_url)
    return build_named(name, source, **kwargs)


def _named_constructor(name: str) -> Callable[..., DinoVisionTransformer]:
    def constructor(
        *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs
    ) -> DinoVisionTransformer:
        spec = MODELS[name]
        source = weights_source(
            name, weights, pretrained=pretrained, tags=(Weights.LVD142M.name,), release_url=spec.weights_url
        )
        return build_named(name, source, **kwargs)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (
        f"{MODELS[name].description} with the release hyper-parameters; upstream DINOv2's hub signature.\n\n"
        "``pretrained=True``: the released weights (LVD-142M), downloaded once into torch.hub's cache; "
        "``pretrained=False``: random weights. ``weights``: ``\"LVD142M\"`` / ``\"official\"`` (the release), "
        "or a path, URL or state dict in any layout ``dinoscale.hub.load_state_dict_any`` reads. ``kwargs`` "
        "override the release's DinoVisionTransformer arguments."
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


# ---------------------------------------------------------------------------------------------------- DINOv3

DINOV3_DOWNLOAD_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


class Dinov3Weights(Enum):
    """Upstream DINOv3's names of the released backbone weights (the pretraining data)."""

    LVD1689M = "LVD1689M"
    SAT493M = "SAT493M"


@dataclass(frozen=True)
class Dinov3Release:
    """A released DINOv3 backbone: its architecture (``factory.DINOV3_ARCHS``, named as the release), the hash
    suffix of its file for each set of weights, and a one-line description."""

    arch: str
    hashes: dict[str, str]  # Dinov3Weights name -> hash in the file name
    description: str

    def file_name(self, tag: str) -> str:
        """Upstream's file name, e.g. ``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``."""
        return f"{self.arch}_pretrain_{tag.lower()}-{self.hashes[tag]}.pth"


# name -> release (facebookresearch/dinov3, dinov3/hub/backbones.py: architectures and file hashes)
DINOV3_MODELS: dict[str, Dinov3Release] = {
    "dinov3_vits16": Dinov3Release("dinov3_vits16", {"LVD1689M": "08c60483"}, "DINOv3 ViT-S/16 distilled"),
    "dinov3_vits16plus": Dinov3Release(
        "dinov3_vits16plus", {"LVD1689M": "4057cbaa"}, "DINOv3 ViT-S+/16 distilled (SwiGLU)"
    ),
    "dinov3_vitb16": Dinov3Release("dinov3_vitb16", {"LVD1689M": "73cec8be"}, "DINOv3 ViT-B/16 distilled"),
    "dinov3_vitl16": Dinov3Release(
        "dinov3_vitl16", {"LVD1689M": "8aa4cbdd", "SAT493M": "eadcf0ff"}, "DINOv3 ViT-L/16 distilled"
    ),
    "dinov3_vitl16plus": Dinov3Release(
        "dinov3_vitl16plus", {"LVD1689M": "46503df0"}, "DINOv3 ViT-L+/16 distilled (SwiGLU)"
    ),
    "dinov3_vith16plus": Dinov3Release(
        "dinov3_vith16plus", {"LVD1689M": "7c1da9a5"}, "DINOv3 ViT-H+/16 distilled (SwiGLU)"
    ),
    "dinov3_vit7b16": Dinov3Release(
        "dinov3_vit7b16", {"LVD1689M": "a955f4ea", "SAT493M": "a6675841"}, "DINOv3 ViT-7B/16"
    ),
}
assert all(spec.arch in DINOV3_ARCHS for spec in DINOV3_MODELS.values())


def dinov3_weights_path(name: str, weights: str = Dinov3Weights.LVD1689M.name) -> Path:
    """Where the released DINOv3 file ``name`` / ``weights`` is looked for: torch.hub's cache,
    ``torch.hub.get_dir()/checkpoints/<upstream's file name>`` (upstream's hub caches a signed URL's file there)."""
    spec = DINOV3_MODELS[name]
    if weights not in spec.hashes:
        raise ValueError(f"{name} was released with weights {sorted(spec.hashes)}, not {weights!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.file_name(weights)


def _how_to_get_dinov3(name: str, weights: str = Dinov3Weights.LVD1689M.name) -> str:
    path = dinov3_weights_path(name, weights)
    return (
        f"Meta hands out the released DINOv3 weights through signed URLs only: request them at "
        f"{DINOV3_DOWNLOAD_PAGE}, download {path.name} and put it at {path} (torch.hub's cache, "
        f"torch.hub.get_dir()/checkpoints; $TORCH_HOME moves it), then dinoscale.hub.load({name!r}, "
        "weights='official'); or pass weights=<the downloaded file, or its signed URL>."
    )


def dinov3_weights_source(
    name: str, weights: WeightsArg, *, pretrained: bool
) -> str | os.PathLike | Mapping | None:
    """What the DINOv3 model ``name`` loads: the released file in torch.hub's cache (``"official"``,
    ``"LVD1689M"``, ``"SAT493M"`` or the Dinov3Weights member, when ``pretrained``), the given path / URL /
    state dict, or None (random weights). A release tag whose file is not in the cache is one
    WeightsLoadError saying where to get the file and where to put it; nothing is downloaded."""
    spec = DINOV3_MODELS[name]
    tag = _tag(weights)
    if tag == OFFICIAL:
        tag = Dinov3Weights.LVD1689M.name
    if tag in Dinov3Weights.__members__:
        if tag not in spec.hashes:
            raise ValueError(f"{name} was released with weights {sorted(spec.hashes)}, not {tag!r}")
        if not pretrained:
            return None
        path = dinov3_weights_path(name, tag)
        if not path.is_file():
            how = _how_to_get_dinov3(name, tag)
            raise WeightsLoadError(f"{name}: no released {tag} weights file in torch.hub's cache. {how}")
        return path
    return weights_source(name, weights, pretrained=pretrained, tags=(), release_url="")


def build_dinov3(name: str, source: str | os.PathLike | Mapping | None, **kwargs) -> DinoV3VisionTransformer:
    """The DINOv3 backbone ``name`` with ``kwargs`` overriding the release's arguments, ``source`` loaded into it
    (None: random weights, said once per process).

    Weights holding ``local_cls_norm`` (the 7B, the satellite ViT-L) build the model with
    ``untie_global_and_local_cls_norm=True`` unless ``kwargs`` say otherwise, as upstream's hub does.
    """
    spec = DINOV3_MODELS[name]
    for upstream_only in ("check_hash", "hash", "version"):  # upstream's file-selection arguments
        kwargs.pop(upstream_only, None)
    tensors = None
    if source is not None:
        tensors, _ = read_tensors(source)
        if any(k == "local_cls_norm.weight" or k.endswith(".local_cls_norm.weight") for k in tensors):
            kwargs.setdefault("untie_global_and_local_cls_norm", True)
    model = build_backbone(spec.arch, **kwargs)
    if tensors is None:
        warn_random_weights(name, _how_to_get_dinov3(name))
    else:
        load_state_dict_any(model, tensors)
    return model


def _dinov3_constructor(name: str) -> Callable[..., DinoV3VisionTransformer]:
    def constructor(
        *, pretrained: bool = True, weights: WeightsArg = Dinov3Weights.LVD1689M, check_hash: bool = False, **kwargs
    ) -> DinoV3VisionTransformer:
        return build_dinov3(name, dinov3_weights_source(name, weights, pretrained=pretrained), **kwargs)

    spec = DINOV3_MODELS[name]
    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (
        f"{spec.description} with the release hyper-parameters; upstream DINOv3's hub signature.\n\n"
        f"``pretrained=True``: the released weights ({', '.join(spec.hashes)}), read from torch.hub's cache, where "
        "the file must be put by hand (Meta's signed URLs; the error without it says where); ``pretrained=False``: "
        "random weights. ``weights``: a release tag, ``\"official\"``, or a path, URL or state dict in the "
        "official, Hugging Face or timm layout. ``check_hash`` is accepted for upstream's signature and not used. "
        "``kwargs`` override the release's DinoV3VisionTransformer arguments."
    )
    return constructor


# The torch.hub entry points (hubconf.py), one per entry of DINOV3_MODELS.
dinov3_vits16 = _dinov3_constructor("dinov3_vits16")
dinov3_vits16plus = _dinov3_constructor("dinov3_vits16plus")
dinov3_vitb16 = _dinov3_constructor("dinov3_vitb16")
dinov3_vitl16 = _dinov3_constructor("dinov3_vitl16")
dinov3_vitl16plus = _dinov3_constructor("dinov3_vitl16plus")
dinov3_vith16plus = _dinov3_constructor("dinov3_vith16plus")
dinov3_vit7b16 = _dinov3_constructor("dinov3_vit7b16")
