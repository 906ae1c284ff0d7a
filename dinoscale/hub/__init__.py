"""Named DINOv2 models (backbones and linear classifiers), named DINOv3 backbones, and a loader for weights in
any common layout.

``load(name, weights=...)`` builds a named backbone (``MODELS``); ``dinov2_vits14(...)``, ...,
``dinov2_vitg14_reg_lc(...)`` are upstream facebookresearch/dinov2's hub entry points with its signature
(``pretrained=True`` gets the released weights); ``load_state_dict_any(model, obj_or_path)`` loads the backbone
found in a checkpoint of any supported layout (official DINOv2, timm, Hugging Face, dinoscale training
checkpoints, torch.distributed.checkpoint directories) into a model, and makes its position-embedding
interpolation follow the library the weights come from. The modules:

* ``io``: reading files, ``save_pretrained`` directories, DCP directories and URLs (``weights_only`` loads;
  URLs cached in torch.hub's cache);
* ``convert``: finding the backbone in a checkpoint, detecting its layout, converting it to the official one;
* ``loading``: fitting converted weights to a model and loading them strictly, with a readable error; the
  interpolation of the weights' source;
* ``zoo``: the tables of named backbones (DINOv2 and DINOv3), their release files and constructors;
* ``classifiers``: the released ImageNet-1k linear classifiers (backbone + linear head) and their constructors.

``hubconf.py`` exposes the constructors to ``torch.hub.load``.
"""

from dinoscale.hub.classifiers import (
    ClassifierWeights,
    LinearClassifier,
    dinov2_vitb14_lc,
    dinov2_vitb14_reg_lc,
    dinov2_vitg14_lc,
    dinov2_vitg14_reg_lc,
    dinov2_vitl14_lc,
    dinov2_vitl14_reg_lc,
    dinov2_vits14_lc,
    dinov2_vits14_reg_lc,
    load_linear_head,
)
from dinoscale.hub.convert import (
    convert_to_dinov2,
    convert_to_dinov3,
    detect_dinov3_layout,
    detect_layout,
    dinov2_filter_fn,
    dinov3_to_hf,
    flatten_state_dict,
    hf_to_dinov2,
    hf_to_dinov3,
    select_backbone,
    strip_wrapper_keys,
    timm_to_dinov2,
    timm_to_dinov3,
)
from dinoscale.hub.io import WeightsLoadError, read_checkpoint, url_cache_path
from dinoscale.hub.loading import load_state_dict_any, source_interpolation
from dinoscale.hub.zoo import (
    DINOV2_BASE_URL,
    DINOV3_DOWNLOAD_PAGE,
    DINOV3_MODELS,
    MODELS,
    Dinov3Release,
    Dinov3Weights,
    NamedModel,
    Weights,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
    dinov3_weights_path,
    load,
    official_weights_url,
)

__all__ = [
    "DINOV2_BASE_URL",
    "DINOV3_DOWNLOAD_PAGE",
    "DINOV3_MODELS",
    "MODELS",
    "ClassifierWeights",
    "Dinov3Release",
    "Dinov3Weights",
    "LinearClassifier",
    "NamedModel",
    "Weights",
    "WeightsLoadError",
    "convert_to_dinov2",
    "convert_to_dinov3",
    "detect_dinov3_layout",
    "detect_layout",
    "dinov2_filter_fn",
    "dinov2_vitb14",
    "dinov2_vitb14_lc",
    "dinov2_vitb14_reg",
    "dinov2_vitb14_reg_lc",
    "dinov2_vitg14",
    "dinov2_vitg14_lc",
    "dinov2_vitg14_reg",
    "dinov2_vitg14_reg_lc",
    "dinov2_vitl14",
    "dinov2_vitl14_lc",
    "dinov2_vitl14_reg",
    "dinov2_vitl14_reg_lc",
    "dinov2_vits14",
    "dinov2_vits14_lc",
    "dinov2_vits14_reg",
    "dinov2_vits14_reg_lc",
    "dinov3_to_hf",
    "dinov3_vit7b16",
    "dinov3_vitb16",
    "dinov3_vith16plus",
    "dinov3_vitl16",
    "dinov3_vitl16plus",
    "dinov3_vits16",
    "dinov3_vits16plus",
    "dinov3_weights_path",
    "flatten_state_dict",
    "hf_to_dinov2",
    "hf_to_dinov3",
    "load",
    "load_linear_head",
    "load_state_dict_any",
    "official_weights_url",
    "read_checkpoint",
    "select_backbone",
    "source_interpolation",
    "strip_wrapper_keys",
    "timm_to_dinov2",
    "timm_to_dinov3",
    "url_cache_path",
]
