"""The backbone an export starts from: a run directory, a checkpoint, a weights file, or a named architecture.

A path inside a training run (``RUN/checkpoints/step_N``, ``RUN/export/teacher_backbone.safetensors``) takes
its architecture from the run's ``config.yaml``; a path elsewhere needs ``arch`` (+ ``model_kwargs``) or
``config``. Everything is then loaded by :func:`dinoscale.eval.backbones.load_backbone`, the evaluation tools'
loader, so the export CLI takes the same backbone options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from dinoscale import hub
from dinoscale.eval.backbones import load_backbone
from dinoscale.export.backbone import ExportError
from dinoscale.models.factory import ARCHS, DINOV3_ARCHS
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

RUN_CONFIG = "config.yaml"


def run_config_above(path: Path) -> Optional[Path]:
    """``config.yaml`` of the run holding ``path`` (a checkpoint or export two levels down), if any."""
    for parent in list(path.resolve().parents)[:2]:
        if (parent / RUN_CONFIG).is_file():
            return parent / RUN_CONFIG
    return None


def backbone_from_source(
    source: Optional[str],
    *,
    arch: Optional[str] = None,
    weights: Optional[str] = None,
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    model_kwargs: Optional[dict[str, Any]] = None,
) -> DinoVisionTransformer | DinoV3VisionTransformer:
    """The frozen backbone ``source`` names (see the module docstring); ``source`` None: the options alone."""
    options = dict(config=config, overrides=overrides, model_kwargs=model_kwargs)
    if source is None:
        return load_backbone(arch, weights, **options)
    path = Path(source).expanduser()
    if path.exists():
        if weights is not None:
            raise ExportError(f"SOURCE {source} is a path already: --weights is only for a named architecture")
        is_run = path.is_dir() and (path / RUN_CONFIG).is_file()
        if not is_run and arch is None and config is None:
            found = run_config_above(path)
            if found is None:
                raise ExportError(
                    f"cannot tell the architecture of {source} (no run {RUN_CONFIG} above it): "
                    "pass --arch (with --model-arg) or --config"
                )
            options["config"] = str(found)
        return load_backbone(arch, str(path), **options)
    if source in hub.MODELS or source in hub.DINOV3_MODELS or source in ARCHS or source in DINOV3_ARCHS:
        if arch is not None:
            raise ExportError(f"SOURCE {source} is an architecture already; drop --arch {arch}")
        return load_backbone(source, weights, **options)
    raise ExportError(
        f"source not found: {source} is neither an existing path nor a known architecture "
        f"({', '.join(sorted(hub.MODELS) + sorted(hub.DINOV3_MODELS) + sorted(ARCHS))})"
    )
