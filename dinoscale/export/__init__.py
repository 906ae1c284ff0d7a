"""Exporting a backbone for other libraries.

* ``onnx.py``: one ``.onnx`` file, dynamic batch and image size, outputs ``cls_token`` and ``patch_tokens``.

``backbone.py`` reads the architecture off the module; ``output.py`` writes the files (staged, existing outputs
refused unless overwriting).
"""

from dinoscale.export.backbone import BackboneSpec, ExportError, backbone_spec, export_state_dict
from dinoscale.export.onnx import export_onnx

__all__ = ["BackboneSpec", "ExportError", "backbone_spec", "export_onnx", "export_state_dict"]
