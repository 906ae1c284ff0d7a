"""Named DINOv2 backbones and a loader for released or trained weights in any common layout.

``load(name, weights=...)`` builds a named backbone (``MODELS``); ``load_state_dict_any(model, obj_or_path)``
loads the backbone found in a checkpoint of any supported layout (official DINOv2, timm, Hugging Face, dinoscale
training checkpoints, torch.distributed.checkpoint directories) into a model. The modules:

* ``io``: reading files, ``save_pretrained`` directories, DCP directories and URLs (``weights_only`` loads);
* ``convert``: finding the backbone in a checkpoint, detecting its layout, converting it to the official one;
* ``loading``: fitting converted weights to a model and loading them strictly, with a readable error;
* ``zoo``: the table of named models and their constructors (``hubconf.py`` exposes them to ``torch.hub``).
"""

from dinoscale.hub.convert import (
    convert_to_dinov2,
    detect_layout,
    dinov2_filter_fn,
    flatten_state_dict,
    hf_to_dinov2,
    select_backbone,
    strip_wrapper_keys,
    timm_to_dinov2,
)
from dinoscale.hub.io import WeightsLoadError, read_checkpoint
from dinoscale.hub.loading import load_state_dict_any
from dinoscale.hub.zoo import (
    DINOV2_BASE_URL,
    MODELS,
    NamedModel,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    load,
    official_weights_url,
)

__all__ = [
    "DINOV2_BASE_URL",
    "MODELS",
    "NamedModel",
    "WeightsLoadError",
    "convert_to_dinov2",
    "detect_layout",
    "dinov2_filter_fn",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "flatten_state_dict",
    "hf_to_dinov2",
    "load",
    "load_state_dict_any",
    "official_weights_url",
    "read_checkpoint",
    "select_backbone",
    "strip_wrapper_keys",
    "timm_to_dinov2",
]
