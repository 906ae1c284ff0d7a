"""ONNX export: the traced position-embedding resize equals the model's, and one exported file runs in ONNX
Runtime at several batch and image sizes with the PyTorch model's outputs."""

import itertools

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.export.conftest import BACKBONES, assert_close_tokens, tiny_backbone
from dinoscale.export.backbone import ExportError
from dinoscale.export.onnx import INPUT_NAME, OUTPUT_NAMES, OnnxBackbone, export_onnx, traceable_pos_encoding
from dinoscale.models.vit import DinoVisionTransformer

MODES = list(itertools.product((0.0, 0.1), (False, True)))  # (interpolate_offset, interpolate_antialias)


@pytest.mark.parametrize("offset, antialias", MODES)
@pytest.mark.parametrize("img_size", [56, 518])  # grids 4 and 37 (the released models')
def test_traceable_pos_encoding_equals_the_models(offset, antialias, img_size):
    model = DinoVisionTransformer(
        img_size=img_size, patch_size=14, embed_dim=8, depth=1, num_heads=2,
        interpolate_offset=offset, interpolate_antialias=antialias,
    )
    with torch.no_grad():
        model.pos_embed.normal_()
    side = img_size // 14
    x = torch.zeros(1, 1, 8)
    # up and down, square and not, one-patch rows, and the model's own grid (returned unchanged)
    for rows, cols in [(side, side), (1, 1), (2, 3), (side + 1, side - 1), (3 * side, 2), (side // 2 + 1, 2 * side)]:
        expected = model.interpolate_pos_encoding(x, cols * 14, rows * 14)
        actual = traceable_pos_encoding(model, x, cols * 14, rows * 14)
        assert actual.shape == expected.shape
        # a unit-variance embedding: only the order of the float32 sums differs (3.6e-6 at most seen)
        assert (actual - expected).abs().max().item() <= 1e-5, (rows, cols)


def test_onnx_backbone_leaves_the_model_alone():
    model = tiny_backbone()
    wrapped = OnnxBackbone(model)
    assert all(b.attn.attn_backend == "math" for b in wrapped.backbone.blocks)
    assert all(b.attn.attn_backend == "sdpa" for b in model.blocks)
    assert "interpolate_pos_encoding" not in vars(model)
    x = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        cls, patches = wrapped(x)
        out = model.forward_features(x)
    assert_close_tokens(cls, out["x_norm_clstoken"], atol=1e-5)
    assert_close_tokens(patches, out["x_norm_patchtokens"], atol=1e-5)


@pytest.mark.parametrize("kind", ["release", "registers"])
def test_onnx_runs_at_two_batch_and_two_image_sizes(tmp_path, kind):
    model = tiny_backbone(**BACKBONES[kind])
    path = tmp_path / "backbone.onnx"
    assert export_onnx(model, path) == [path]

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert dims(proto.graph.output[0]) == ["batch", 32]
    assert dims(proto.graph.output[1]) == ["batch", "num_patches", 32]
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["patch_size"] == "14" and metadata["num_register_tokens"] == str(model.num_register_tokens)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    # the trained size and a non-square one that resamples the position embedding (down in height, up in width)
    for batch, (h, w) in itertools.product((1, 3), ((56, 56), (42, 98))):
        x = torch.randn(batch, 3, h, w, generator=gen)
        cls, patches = session.run(None, {INPUT_NAME: x.numpy()})
        with torch.no_grad():
            out = model.forward_features(x)
        assert cls.shape == (batch, 32) and patches.shape == (batch, (h // 14) * (w // 14), 32)
        assert_close_tokens(torch.from_numpy(cls), out["x_norm_clstoken"])
        assert_close_tokens(torch.from_numpy(patches), out["x_norm_patchtokens"])
        assert np.isfinite(patches).all()


def test_an_existing_file_is_refused_before_exporting(tmp_path):
    (tmp_path / "backbone.onnx").write_bytes(b"keep")
    with pytest.raises(ExportError, match="output exists"):
        export_onnx(tiny_backbone(), tmp_path / "backbone.onnx")
    assert (tmp_path / "backbone.onnx").read_bytes() == b"keep"
