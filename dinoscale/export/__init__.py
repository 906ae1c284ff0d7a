"""Exporting a backbone for other libraries: ONNX, Hugging Face ``transformers``, timm, the official layout.

``export_backbone(model, to, output)`` writes a :class:`~dinoscale.models.vit.DinoVisionTransformer` (a
:class:`~dinoscale.models.vit_dinov3.DinoV3VisionTransformer` to ``hf``, ``timm`` and ``official``):

* ``"onnx"`` (``onnx.py``): one ``.onnx`` file, dynamic batch and image size, outputs ``cls_token`` and
  ``patch_tokens``;
* ``"hf"`` (``huggingface.py``): a folder ``Dinov2Model`` / ``Dinov2WithRegistersModel.from_pretrained`` loads
  (``DINOv3ViTModel`` for a DINOv3 backbone);
* ``"timm"`` (``timm.py``): a folder with safetensors weights, a config and a README with the
  ``timm.create_model`` call (``vit_*_dinov2``, or ``vit_*_patch16_dinov3`` for a DINOv3 backbone);
* ``"official"`` (``official.py``): ``PREFIX.pth`` + ``PREFIX.safetensors`` in dinoscale's own layout.

``backbone_from_source`` (``source.py``) loads the backbone from a run directory, a checkpoint, a weights file
or a named architecture; ``tools/export.py`` is the command line. ``backbone.py`` reads the architecture
off the module; ``output.py`` writes the files (staged, existing outputs refused unless overwriting).
"""

from __future__ import annotations

from pathlib import Path

from dinoscale.export.backbone import BackboneSpec, ExportError, backbone_spec, export_state_dict
from dinoscale.export.huggingface import export_huggingface
from dinoscale.export.official import export_official
from dinoscale.export.onnx import export_onnx
from dinoscale.export.source import backbone_from_source
from dinoscale.export.timm import export_timm
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

EXPORTERS = {"onnx": export_onnx, "hf": export_huggingface, "timm": export_timm, "official": export_official}


def export_backbone(
    model: DinoVisionTransformer | DinoV3VisionTransformer, to: str, output: str | Path, *, overwrite: bool = False
) -> list[Path]:
    """Write ``model`` for the target ``to`` (a key of ``EXPORTERS``) at ``output``; returns the written files."""
    if to not in EXPORTERS:
        raise ExportError(f"unknown export target {to!r}; choose one of {sorted(EXPORTERS)}")
    return EXPORTERS[to](model, output, overwrite=overwrite)


__all__ = [
    "EXPORTERS",
    "BackboneSpec",
    "ExportError",
    "backbone_from_source",
    "backbone_spec",
    "export_backbone",
    "export_huggingface",
    "export_official",
    "export_onnx",
    "export_state_dict",
    "export_timm",
]
