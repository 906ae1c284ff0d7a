#!/usr/bin/env python
"""Export a (sharded) training checkpoint's teacher backbone in the official DINOv2 layout.

    python tools/export_backbone.py runs/fm/checkpoints/step_000001000 out/vits14 [--heads]

writes ``out/vits14.pth`` and ``out/vits14.safetensors`` (and ``out/vits14_heads.*``): plain state dicts that
``dinoscale.hub.load`` and ``torch.load`` + ``load_state_dict(strict=True)`` read. No process group is needed;
the shards are gathered from the checkpoint files. A run directory picks its latest checkpoint.

For ONNX, Hugging Face or timm (or the official layout from any loadable backbone), see ``tools/export.py``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoscale.checkpoint import CheckpointError, export_from_checkpoint, latest_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoints/step_* directory, or a run's output directory")
    parser.add_argument("out_prefix", help="output path without extension")
    parser.add_argument("--heads", action="store_true", help="also export the DINO/iBOT heads")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    if not (path / ".metadata").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            print(f"error: {path} is neither a checkpoint directory nor a run with checkpoints", file=sys.stderr)
            return 2
        path = latest
    try:
        written = export_from_checkpoint(path, args.out_prefix, heads=args.heads)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
