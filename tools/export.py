#!/usr/bin/env python
"""Export a backbone for ONNX Runtime, Hugging Face transformers or timm (or in the official layout).

    python tools/export.py runs/fm --to onnx --output fm.onnx
    python tools/export.py runs/fm --to hf --output fm_hf/
    python tools/export.py runs/fm/checkpoints/step_000001000 --to timm --output fm_timm/
    python tools/export.py dinov2_vits14 --weights dinov2_vits14_pretrain.pth --to onnx --output vits14.onnx
    python tools/export.py dinov3_vits16 --weights dinov3-vits16-pretrain-lvd1689m/ --to timm --output v3s_timm/
    python tools/export.py --arch vit_small --model-arg patch_size=14 --weights w.pth --to official --output out/w

SOURCE: a training run directory (its exported teacher, else its newest checkpoint), a checkpoint
(``checkpoints/step_*`` directory or a file) or an exported weights file (inside a run, the run's config.yaml
gives the architecture; elsewhere pass ``--arch``/``--model-arg`` or ``--config``), or a ``dinoscale.hub``
name / architecture with ``--weights``. The backbone options are those of the evaluation tools.

Targets (``--output``):

* ``onnx``: a ``.onnx`` file; input ``pixel_values`` (batch, C, H, W), H and W multiples of the patch size,
  any batch; outputs ``cls_token`` (batch, D) and ``patch_tokens`` (batch, H/p * W/p, D), both after the
  final norm. ``onnxruntime.InferenceSession(path).run(None, {"pixel_values": images})``.
* ``hf``: a folder for ``transformers.Dinov2Model.from_pretrained`` (``Dinov2WithRegistersModel`` with
  registers): ``last_hidden_state[:, 0]`` is the CLS token, ``[:, 1 + registers:]`` the patch tokens.
* ``timm``: a folder (model.safetensors, config.json, README.txt with the ``timm.create_model`` call);
  ``vit_*_patch14_dinov2`` for a DINOv2-layout backbone, ``vit_*_patch16_dinov3`` for a DINOv3 one.
* ``official``: ``PATH.pth`` and ``PATH.safetensors`` in dinoscale's own layout (the official DINOv3 layout for
  a DINOv3 backbone). To export a checkpoint's teacher and heads without building the model, see
  ``tools/export_backbone.py``.

DINOv3 backbones (``model.arch: dinov3_*`` runs, ``dinov3_*`` names) export to ``hf``, ``timm`` and ``official``.

An existing output is refused unless ``--overwrite``. The module is ``dinoscale.export``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinoscale.checkpoint import CheckpointError  # noqa: E402
from dinoscale.eval.backbones import add_backbone_args, parse_model_args  # noqa: E402
from dinoscale.export import EXPORTERS, ExportError, backbone_from_source, backbone_spec, export_backbone  # noqa: E402
from dinoscale.export import huggingface as hf_export, timm as timm_export  # noqa: E402
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer  # noqa: E402

# How each target resizes position embeddings, if not like the backbone: printed after the export.
_INTERPOLATION_MATCHES = {"hf": hf_export.interpolation_matches, "timm": timm_export.interpolation_matches}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="run directory, checkpoint, weights file, or hub name / arch")
    parser.add_argument("--to", required=True, choices=sorted(EXPORTERS), help="export target")
    parser.add_argument("--output", required=True, help="output file (onnx), folder (hf, timm) or prefix (official)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing output")
    add_backbone_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = backbone_from_source(
            args.source,
            arch=args.arch,
            weights=args.weights,
            config=args.config,
            overrides=args.override,
            model_kwargs=parse_model_args(args.model_arg),
        )
        written = export_backbone(model, args.to, args.output, overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    named = args.source is None or not Path(args.source).expanduser().exists()
    if named and args.weights is None and args.config is None:
        print("note: no --weights given: the export holds randomly initialised weights", file=sys.stderr)
    if isinstance(model, DinoV3VisionTransformer):
        return 0  # RoPE: no position embedding to resize, the targets agree at every size
    spec = backbone_spec(model)
    matches = _INTERPOLATION_MATCHES.get(args.to)
    if matches is not None and not matches(spec):
        print(
            f"note: {args.to} resizes position embeddings unlike this backbone (interpolate_offset="
            f"{spec.interpolate_offset}, interpolate_antialias={spec.interpolate_antialias}): outputs agree at "
            f"{spec.img_size}x{spec.img_size} only",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
