#!/usr/bin/env python
"""How close the exports of ``tools/export.py`` come to the PyTorch backbone, on a release-sized ViT-S/14.

    python benchmarks/export_parity.py [--arch dinov2_vits14] [--seed 0]

Builds the named backbone with seeded random weights (nothing is downloaded), exports it with the tool to ONNX,
a Hugging Face folder and a timm folder in a temporary directory, loads each with its own runtime (onnxruntime,
``transformers``, ``timm``) and prints the largest absolute difference of the normalised CLS and patch tokens from
``forward_features``: ONNX at three batch x image sizes from one file, transformers and timm at the release's
518 px (away from it those libraries resize the position embedding their own way; ``tools/export.py`` says so).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale import hub  # noqa: E402

ONNX_SHAPES = [(4, 224, 224), (1, 518, 518), (2, 448, 336)]


def export(weights: Path, arch: str, target: str, output: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), arch, "--weights", str(weights),
                    "--to", target, "--output", str(output)], check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="dinov2_vits14", help="a dinoscale.hub name")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime
    import timm
    import transformers

    torch.manual_seed(args.seed)
    model = hub.load(args.arch, weights=None).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights.pth"
        torch.save(model.state_dict(), weights)
        for target, output in (("onnx", "model.onnx"), ("hf", "hf"), ("timm", "timm")):
            export(weights, args.arch, target, tmp / output)
        session = onnxruntime.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        hf_cls = transformers.Dinov2WithRegistersModel if model.num_register_tokens else transformers.Dinov2Model
        hf_model = hf_cls.from_pretrained(tmp / "hf").eval()
        timm_model = timm.create_model(f"local-dir:{tmp / 'timm'}", pretrained=True).eval()

        release_size = hub.MODELS[args.arch].kwargs["img_size"]
        print("| target | batch x H x W | max abs diff CLS | max abs diff patches |")
        print("| --- | --- | --- | --- |")
        first_patch = 1 + model.num_register_tokens
        for b, h, w in ONNX_SHAPES:
            x = torch.randn(b, 3, h, w)
            with torch.no_grad():
                ours = model.forward_features(x)
            cls_ref, patch_ref = ours["x_norm_clstoken"], ours["x_norm_patchtokens"]
            cls, patches = session.run(None, {"pixel_values": x.numpy()})
            print(f"| onnx | {b}x{h}x{w} | {np.abs(cls - cls_ref.numpy()).max():.1e} | "
                  f"{np.abs(patches - patch_ref.numpy()).max():.1e} |")
            if h == w == release_size:
                with torch.no_grad():
                    hf_tokens = hf_model(pixel_values=x).last_hidden_state
                    timm_tokens = timm_model.forward_features(x)
                for name, tokens in (("hf", hf_tokens), ("timm", timm_tokens)):
                    print(f"| {name} | {b}x{h}x{w} | {(tokens[:, 0] - cls_ref).abs().max():.1e} | "
                          f"{(tokens[:, first_patch:] - patch_ref).abs().max():.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
