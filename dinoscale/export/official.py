"""Export in dinoscale's own layout (the official DINOv2 one, the official DINOv3 one for a DINOv3 backbone):
``PREFIX.pth`` and ``PREFIX.safetensors``.

The same files as ``tools/export_backbone.py`` writes from a checkpoint's teacher
(:func:`dinoscale.checkpoint.save_backbone`), here from any loaded backbone.
"""

from __future__ import annotations

from pathlib import Path

from dinoscale.checkpoint import save_backbone
from dinoscale.export.backbone import backbone_spec
from dinoscale.export.output import staged_files
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer


def export_official(
    model: DinoVisionTransformer | DinoV3VisionTransformer, out_prefix: str | Path, *, overwrite: bool = False
) -> list[Path]:
    """Write the backbone's state dict as ``out_prefix.pth`` and ``out_prefix.safetensors``."""
    if not isinstance(model, DinoV3VisionTransformer):  # its state dict is the official DINOv3 layout already
        backbone_spec(model)  # refuses anything but a DinoVisionTransformer
    out_prefix = Path(out_prefix)
    names = [out_prefix.with_suffix(suffix).name for suffix in (".pth", ".safetensors")]
    with staged_files(out_prefix.parent, names, overwrite) as staging:
        save_backbone(model.state_dict(), staging / out_prefix.name)
    return [out_prefix.parent / name for name in names]
