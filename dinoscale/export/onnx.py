"""ONNX export of a backbone: one graph for any batch size and any image size that is a multiple of the patch.

The graph (``torch.onnx.export`` with the dynamo exporter) has one input and two outputs:

* ``pixel_values``: float32 ``(batch, in_chans, height, width)``, normalised images (ImageNet mean/std for
  the released models and dinoscale training); ``height`` and ``width`` must be multiples of the patch size.
  ONNX Runtime does not check this: the patch convolution drops the pixels past the last whole patch.
* ``cls_token``: ``(batch, embed_dim)``, the normalised CLS token (``x_norm_clstoken``);
* ``patch_tokens``: ``(batch, num_patches, embed_dim)``, the normalised patch tokens in row-major order
  (``x_norm_patchtokens``; ``num_patches = height / patch * width / patch``; register tokens are left out).

The position embedding is resized inside the graph to the input's patch grid. ``F.interpolate`` exports with
dynamic sizes only when given a target size; the original DINOv2 release instead resizes by a scale factor
``(n + offset) / M`` (``interpolate_offset``), which the exporter would freeze to the example input. So the
graph resizes with explicit bicubic resampling matrices (:func:`resampling_matrix`) that reproduce PyTorch's
bicubic and antialiased bicubic kernels for every offset, computed from the input's grid size at run time.
Attention runs as the explicit formula (``math``): the fused path's CPU dispatch branches on the token count,
which the exporter would also freeze.
"""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import torch
import torch.nn as nn

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.export.backbone import ExportError, backbone_spec
from dinoscale.export.output import refuse_existing, staged_files
from dinoscale.models.vit import DinoVisionTransformer

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("cls_token", "patch_tokens")


def _keys_cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter ``a`` (PyTorch: -0.75 bicubic, -0.5 antialiased)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resampling_matrix(n_out: int, n_in: int, offset: float, antialias: bool) -> torch.Tensor:
    """``(n_out, n_in)`` float32 weights of PyTorch's 1-d bicubic resize of ``n_in`` samples to ``n_out``.

    ``offset`` 0: ``F.interpolate(size=n_out)``; else ``F.interpolate(scale_factor=(n_out + offset) / n_in)``
    (same output length, sampling positions shifted), as in :func:`dinoscale.models.vit.resample_pos_embed`.
    Built from tensor operations only, so ``n_out`` may be a symbolic size when exporting.
    """
    in_index = torch.arange(n_in, dtype=torch.float32)
    # PyTorch's kernels take the scale (input samples per output sample) as float32 and form each sampling
    # position from it with a single rounding (in double, or a fused multiply-add); the same here, in float64.
    # Rounding twice in float32 moves positions by an ulp, 3e-5 of a unit embedding on the 37x37 grid.
    scale = (n_in / (torch.full((), n_out, dtype=torch.float64) + offset)).float()
    out_centre = torch.arange(n_out, dtype=torch.float64) + 0.5
    if antialias:
        # The kernel is widened by the scale when downsampling; weights are renormalised at the borders.
        centre = (scale.double() * out_centre).float()
        weights = _keys_cubic((in_index - centre[:, None] + 0.5) / scale.clamp(min=1.0), -0.5)
        return weights / weights.sum(dim=-1, keepdim=True)
    source = (scale.double() * out_centre - 0.5).float()
    taps = source.floor()[:, None] + torch.arange(-1, 3, dtype=torch.float32)  # four neighbours
    coefficients = _keys_cubic(taps - source[:, None], -0.75)
    clamped = taps.clamp(0, n_in - 1)  # border samples repeat
    return ((clamped[..., None] == in_index) * coefficients[..., None]).sum(dim=1)


def traceable_pos_encoding(model: DinoVisionTransformer, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Same result as ``model.interpolate_pos_encoding(x, w, h)``, with the grid size traced, not frozen."""
    p = model.patch_size
    rows, cols = h // p, w // p
    pos_embed = model.pos_embed.float()
    side, dim = math.isqrt(pos_embed.shape[1] - 1), pos_embed.shape[2]
    grid = pos_embed[0, 1:].reshape(side, side, dim)
    # The model returns its own grid unchanged (no resampling with the offset); identity matrices do the same.
    same_grid = (torch.full((), rows) == side) & (torch.full((), cols) == side)

    def matrix(n: int) -> torch.Tensor:
        identity = (torch.arange(n)[:, None] == torch.arange(side)).float()
        resampled = resampling_matrix(n, side, model.interpolate_offset, model.interpolate_antialias)
        return torch.where(same_grid, identity, resampled)

    patch_pos = torch.einsum("rm,mnd,cn->rcd", matrix(rows), grid, matrix(cols)).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(x.dtype)


class OnnxBackbone(nn.Module):
    """What the ONNX graph computes: images -> (normalised CLS token, normalised patch tokens).

    Holds a float32 copy of the backbone whose position-embedding resize is traceable
    (:func:`traceable_pos_encoding`) and whose attention is the explicit formula; the given model is untouched.
    """

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        backbone_spec(backbone)  # refuses anything else
        traced = copy.deepcopy(backbone).float().eval()
        for block in traced.blocks:
            block.attn.attn_backend = "math"
        traced.interpolate_pos_encoding = types.MethodType(traceable_pos_encoding, traced)
        self.backbone = traced

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(pixel_values)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def _example_grid(side: int) -> tuple[int, int]:
    """A small example grid, rows != cols and neither equal to ``side`` nor 1 (sizes the exporter would
    otherwise treat as special)."""
    rows, cols = [n for n in range(2, 6) if n != side][:2]
    return rows, cols


def export_onnx(
    model: DinoVisionTransformer, path: str | Path, *, overwrite: bool = False, opset: int | None = None
) -> list[Path]:
    """Write ``model`` as an ONNX graph to ``path`` (see the module docstring for inputs and outputs).

    Models over 2 GB keep their weights in ``<path>.data`` beside the graph. Returns the written files.
    """
    try:  # torch.onnx's dynamo exporter needs onnx and onnxscript (which brings onnx_ir): optional packages
        import onnx_ir as ir
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxscript (pip install onnx onnxscript): {exc}") from exc

    spec = backbone_spec(model)
    path = Path(path)
    names = [path.name, path.name + ".data"]
    refuse_existing([path.parent / name for name in names], overwrite)  # before the export, which takes a while
    module = OnnxBackbone(model).eval()
    rows, cols = _example_grid(spec.grid_size)
    p = spec.patch_size
    example = torch.randn(2, spec.in_chans, rows * p, cols * p)
    batch = torch.export.Dim("batch", min=1)
    grid_rows, grid_cols = torch.export.Dim("grid_rows", min=1), torch.export.Dim("grid_cols", min=1)
    dynamic_shapes = {"pixel_values": {0: batch, 2: p * grid_rows, 3: p * grid_cols}}
    try:
        program = torch.onnx.export(
            module, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), opset_version=opset, optimize=True, verbose=False,
        )
    except Exception as exc:  # the exporter's own errors carry the reason; name what was being exported
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    graph = program.model.graph
    # Readable dimension names instead of the exporter's expressions ("14*grid_rows", "s68*s79").
    graph.inputs[0].shape = ir.Shape(["batch", spec.in_chans, "height", "width"])
    graph.outputs[0].shape = ir.Shape(["batch", spec.embed_dim])
    graph.outputs[1].shape = ir.Shape(["batch", "num_patches", spec.embed_dim])
    program.model.metadata_props.update(onnx_metadata(model))
    with staged_files(path.parent, names, overwrite) as staging:
        program.save(staging / path.name)
        written = [path.parent / name for name in names if (staging / name).exists()]
    return written


def onnx_metadata(model: DinoVisionTransformer) -> dict[str, str]:
    """The graph's metadata: what the input expects and what the outputs are."""
    spec = backbone_spec(model)
    return {
        "producer": "dinoscale",
        "patch_size": str(spec.patch_size),
        "img_size": str(spec.img_size),
        "embed_dim": str(spec.embed_dim),
        "num_register_tokens": str(spec.num_register_tokens),
        "image_mean": json.dumps(list(IMAGENET_MEAN)),
        "image_std": json.dumps(list(IMAGENET_STD)),
        "outputs": "cls_token: normalised CLS token (batch, embed_dim); patch_tokens: normalised patch tokens "
        "(batch, height/patch * width/patch, embed_dim), row-major",
    }
