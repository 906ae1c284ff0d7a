"""Exporting a backbone for other libraries.

* ``onnx.py``: one ``.onnx`` file, dynamic batch and image size, outputs ``cls_token`` and ``patch_tokens``;
* ``huggingface.py``: a folder ``Dinov2Model`` / ``Dinov2WithRegistersModel.from_pretrained`` loads;
* ``timm.py``: a folder with safetensors weights, a config and a README with the ``timm.create_model`` call.

``backbone.py`` reads the architecture off the module; ``output.py`` writes the files (staged, existing outputs
refused unless overwriting).
"""

from dinoscale.export.backbone import BackboneSpec, ExportError, backbone_spec, export_state_dict
from dinoscale.export.huggingface import export_huggingface
from dinoscale.export.onnx import export_onnx
from dinoscale.export.timm import export_timm

__all__ = [
    "BackboneSpec", "ExportError", "backbone_spec", "export_huggingface", "export_onnx", "export_state_dict",
    "export_timm",
]
