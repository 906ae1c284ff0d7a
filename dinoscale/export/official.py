"""Export in dinoscale's own (the official DINOv2) layout: ``PREFIX.pth`` and ``PREFIX.safetensors``.

The same files as ``tools/export_backbone.py`` writes from a checkpoint's teacher
(:func:`dinoscale.checkpoint.save_backbone`), here from any loaded backbone.
"""

from __future__ import annotations

from pathlib import Path

from dinoscale.checkpoint import save_backbone
from dinoscale.export.backbone import backbone_spec
from dinoscale.export.output import staged_files
from dinoscale.models.vit import DinoVisionTransformer


def export_official(model: DinoVisionTransformer, out_prefix: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write the backbone's state dict as ``out_prefix.pth`` and ``out_prefix.safetensors``."""
    backbone_spec(model)  # refuses anything but a DinoVisionTransformer
    out_prefix = Path(out_prefix)
    names = [out_prefix.with_suffix(suffix).name for suffix in (".pth", ".safetensors")]
    with staged_files(out_prefix.parent, names, overwrite) as staging:
        save_backbone(model.state_dict(), staging / out_prefix.name)
    return [out_prefix.parent / name for name in names]
