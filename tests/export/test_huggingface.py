"""Hugging Face export: transformers loads the folder with no missing or unexpected weights and computes our
features; dinoscale loads it back to the same state dict."""

import json

import pytest
import torch
import transformers

from dinoscale.export import ExportError
from dinoscale.export.backbone import backbone_spec
from dinoscale.export.huggingface import FILES, export_huggingface, interpolation_matches
from dinoscale.hub import load_state_dict_any
from tests.export.conftest import BACKBONES, assert_close_tokens, assert_same_tokens, tiny_backbone

OTHER_SIZE = (42, 98)  # resamples the 4x4 position grid: down in height, up in width


def load_with_transformers(folder, model):
    cls = transformers.Dinov2WithRegistersModel if model.num_register_tokens else transformers.Dinov2Model
    hf, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return hf.eval()


def assert_same_outputs(hf, model, size, gen):
    x = torch.randn(2, 3, *size, generator=gen)
    with torch.no_grad():
        out, hf_out = model.forward_features(x), hf(pixel_values=x)
    assert_same_tokens(hf_out.last_hidden_state, out, model.num_register_tokens)
    assert_close_tokens(hf_out.pooler_output, out["x_norm_clstoken"])


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_transformers_loads_the_folder_with_our_outputs(tmp_path, kind):
    model = tiny_backbone(**BACKBONES[kind])
    folder = tmp_path / "hf"
    assert export_huggingface(model, folder) == [folder / name for name in FILES]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Dinov2WithRegistersModel" if model.num_register_tokens else "Dinov2Model"]
    hf = load_with_transformers(folder, model)
    gen = torch.Generator().manual_seed(0)
    assert_same_outputs(hf, model, (56, 56), gen)
    # The register release's resize is Dinov2WithRegistersModel's; the original release's offset is not
    # Dinov2Model's (which the export says), so there only img_size is compared.
    assert interpolation_matches(backbone_spec(model)) == (kind != "release")
    if kind != "release":
        assert_same_outputs(hf, model, OTHER_SIZE, gen)


@pytest.mark.parametrize("kind", ["release", "registers"])
def test_dinoscale_loads_the_folder_back_unchanged(tmp_path, kind):
    model = tiny_backbone(**BACKBONES[kind])
    export_huggingface(model, tmp_path / "hf")
    loaded = tiny_backbone(seed=1, **BACKBONES[kind])
    assert load_state_dict_any(loaded, tmp_path / "hf") == "huggingface"
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_missing_layerscale_and_biases_are_written_as_identities(tmp_path):
    model = tiny_backbone(**BACKBONES["bare"])
    export_huggingface(model, tmp_path / "hf")
    # Dinov2Model always has LayerScale and these biases: back in dinoscale they need a backbone that has them.
    with_them = dict(BACKBONES["bare"], init_values=1.0, proj_bias=True, ffn_bias=True)
    loaded = tiny_backbone(seed=1, **with_them)
    load_state_dict_any(loaded, tmp_path / "hf")
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    extra = sorted(set(state) - set(model.state_dict()))
    assert len(extra) == 2 * 5  # per block: ls1, ls2, attn.proj.bias, mlp.w12.bias, mlp.w3.bias
    for key in extra:
        assert torch.equal(state[key], torch.ones_like(state[key]) if "gamma" in key else torch.zeros_like(state[key]))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = model.forward_features(x)["x_norm_patchtokens"]
        assert_close_tokens(loaded.forward_features(x)["x_norm_patchtokens"], expected)


def test_a_non_integer_mlp_ratio_is_refused(tmp_path):
    model = tiny_backbone(mlp_ratio=2.5)  # Dinov2Config's mlp_ratio is an int
    with pytest.raises(ExportError, match="integer mlp_ratio"):
        export_huggingface(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def tiny_dinov3(seed=0, **kwargs):
    from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
    from tests.hub.conftest import randomize_

    args = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4, mask_k_bias=True,
                layerscale_init=1e-5, norm_layer="layernormbf16", pos_embed_rope_rescale_coords=2.0)
    torch.manual_seed(seed)
    return randomize_(DinoV3VisionTransformer(**{**args, **kwargs}), seed).eval()


@pytest.mark.parametrize("kwargs", [{}, {"ffn_layer": "swiglu64", "ffn_ratio": 3, "layerscale_init": None,
                                         "n_storage_tokens": 0, "mask_k_bias": False}], ids=["release", "swiglu_bare"])
def test_transformers_dinov3_loads_the_folder_with_our_outputs(tmp_path, kwargs):
    model = tiny_dinov3(**kwargs)
    export_huggingface(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DINOv3ViTModel"]
    hf, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    hf.eval()
    n_prefix = 1 + model.n_storage_tokens
    for size in [(32, 32), (48, 64)]:  # RoPE: any size divisible by the patch, nothing to interpolate
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            out, ref = model.forward_features(x), hf(pixel_values=x)
        torch.testing.assert_close(ref.pooler_output, out["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref.last_hidden_state[:, n_prefix:], out["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    # and back: dinoscale reads the folder into a fresh model with the same outputs (one with LayerScale: the
    # folder always has it, identity where the exported backbone had none)
    back = tiny_dinov3(seed=1, **{**kwargs, "layerscale_init": 1e-5})
    assert load_state_dict_any(back, tmp_path / "hf") == "huggingface"
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x)["x_norm_patchtokens"], out["x_norm_patchtokens"])


def test_dinov3_untied_cls_norm_is_refused_before_writing(tmp_path):
    with pytest.raises(ExportError, match="unties the CLS and patch norms"):
        export_huggingface(tiny_dinov3(untie_cls_and_patch_norms=True), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
