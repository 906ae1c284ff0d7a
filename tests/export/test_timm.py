"""timm export: the README's load snippets build a timm model whose forward_features are our features;
standard architectures get timm's own names; dinoscale loads the weights back."""

import json
import re

import pytest
import timm
import torch

from dinoscale import hub
from dinoscale.export import ExportError
from dinoscale.export.backbone import backbone_spec
from dinoscale.export.timm import FILES, dinov2_to_timm, export_timm, interpolation_matches, timm_model
from dinoscale.hub import load_state_dict_any
from tests.export.conftest import BACKBONES, assert_close_tokens, assert_same_tokens, tiny_backbone

OTHER_SIZE = (42, 98)


def readme_models(folder):
    """Run both load snippets of the README.txt as written; returns the two models."""
    text = (folder / "README.txt").read_text()
    snippets = re.findall(r"^    model = timm\.create_model\(.*?\)\.eval\(\)$", text, flags=re.S | re.M)
    assert len(snippets) == 2, text
    models = []
    for snippet in snippets:
        scope = {"timm": timm}
        exec(snippet.strip(), scope)  # noqa: S102 - the README's own code
        models.append(scope["model"])
    return models


def assert_same_features(timm_model_, model, size, gen):
    x = torch.randn(2, 3, *size, generator=gen)
    with torch.no_grad():
        tokens, out = timm_model_.forward_features(x), model.forward_features(x)
    assert_same_tokens(tokens, out, model.num_register_tokens)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_the_readme_snippets_load_our_features(tmp_path, kind):
    model = tiny_backbone(**BACKBONES[kind])
    folder = tmp_path / "timm"
    assert export_timm(model, folder) == [folder / name for name in FILES]
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["model_args"]) == timm_model(backbone_spec(model))
    gen = torch.Generator().manual_seed(0)
    for loaded in readme_models(folder):
        assert not loaded.training
        assert_same_features(loaded, model, (56, 56), gen)
        # timm resizes like the register release; the original release's offset only matches at img_size
        assert interpolation_matches(backbone_spec(model)) == (kind != "release")
        if kind != "release":
            assert_same_features(loaded, model, OTHER_SIZE, gen)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_dinoscale_loads_the_weights_back(tmp_path, kind):
    model = tiny_backbone(**BACKBONES[kind])
    export_timm(model, tmp_path / "timm")
    target = dict(BACKBONES[kind])
    if kind == "bare":  # timm's dinov2 models always have LayerScale and the FFN biases (exported as identities)
        target.update(init_values=1.0, proj_bias=True, ffn_bias=True)
    loaded = tiny_backbone(seed=1, **target)
    mask_token = loaded.mask_token.detach().clone()
    # interpolation="model": by default timm-layout weights switch the model to timm's position-embedding resize
    # (tests/hub/test_loading.py); here the loaded model must equal the exported one at every size.
    load_state_dict_any(loaded, tmp_path / "timm", interpolation="model")
    state, expected = loaded.state_dict(), model.state_dict()
    assert torch.equal(state["mask_token"], mask_token)  # timm has none: the model keeps its own
    folded = set()
    if model.num_register_tokens:  # timm adds no position embedding to the class token: the slot is folded in
        folded = {"cls_token", "pos_embed"}
        assert torch.equal(state["cls_token"], expected["cls_token"] + expected["pos_embed"][:, :1])
        assert torch.equal(state["pos_embed"][:, 1:], expected["pos_embed"][:, 1:])
        assert not state["pos_embed"][:, 0].any()
    for key, value in expected.items():
        if key not in folded | {"mask_token"}:
            assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        expected = model.forward_features(x)["x_norm_patchtokens"]
        assert_close_tokens(loaded.forward_features(x)["x_norm_patchtokens"], expected)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dinov2_vits14", "vit_small_patch14_dinov2"),
        ("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2"),
        ("dinov2_vitl14", "vit_large_patch14_dinov2"),
        ("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2"),
    ],
)
def test_released_architectures_get_timms_names(name, expected):
    with torch.device("meta"):  # full size, no memory
        model = hub.load(name)
        timm_name, kwargs = timm_model(backbone_spec(model))
        assert timm_name == expected
        assert kwargs == dict(img_size=518, dynamic_img_size=True, num_classes=0)
        reference = timm.create_model(timm_name, pretrained=False, **kwargs)
    ours = dinov2_to_timm(model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == shapes


# ---------------------------------------------------------------------------------------------------- DINOv3

# Tiny DINOv3 backbones: "release" is a release's layout (GELU MLP, 4 storage tokens, LayerScale, masked key bias;
# random q/v biases: the _qkvb variant); "zero_bias" the same with zero q/v biases (timm's plain model, as the
# released ViT-S/B/L/H+); "swiglu_bare" the 7B's SwiGLU rounding without qkv bias, LayerScale, attention-output and
# FFN biases, with 2 storage tokens and 8 px patches (generic arguments everywhere).
DINOV3_BACKBONES = {
    "release": {},
    "zero_bias": {},
    "swiglu_bare": dict(ffn_layer="swiglu64", ffn_ratio=3, qkv_bias=False, layerscale_init=None, proj_bias=False,
                        ffn_bias=False, n_storage_tokens=2, patch_size=8, mask_k_bias=False),
}
DINOV3_SIZES = [(32, 32), (48, 64)]


def tiny_dinov3(kind="release", seed=0, **kwargs):
    from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
    from tests.hub.conftest import randomize_

    args = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4, mask_k_bias=True,
                layerscale_init=1e-5, norm_layer="layernormbf16", pos_embed_rope_rescale_coords=2.0)
    args.update(DINOV3_BACKBONES[kind], **kwargs)
    torch.manual_seed(seed)
    model = randomize_(DinoV3VisionTransformer(**args), seed).eval()
    if kind == "zero_bias":
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.bias.zero_()
    return model


def assert_dinov3_features(timm_model_, model):
    """timm's ``[cls, storage, patches]`` (and its token-pooled output) against ours at two image sizes."""
    r = model.n_storage_tokens
    for size in DINOV3_SIZES:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            tokens, pooled, out = timm_model_.forward_features(x), timm_model_(x), model.forward_features(x)
        torch.testing.assert_close(tokens[:, 0], out["x_norm_clstoken"], rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens[:, 1 : 1 + r], out["x_storage_tokens"], rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens[:, 1 + r :], out["x_norm_patchtokens"], rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, out["x_norm_clstoken"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(DINOV3_BACKBONES))
def test_dinov3_readme_snippets_load_our_features(tmp_path, kind):
    from dinoscale.export.timm import dinov3_timm_model

    model = tiny_dinov3(kind)
    folder = tmp_path / "timm"
    assert export_timm(model, folder) == [folder / name for name in FILES]
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["model_args"]) == dinov3_timm_model(model)
    family = "vit_small_plus_patch16_dinov3" if kind == "swiglu_bare" else "vit_small_patch16_dinov3"
    assert config["architecture"] == family + ("_qkvb" if kind == "release" else "")
    assert config["model_args"]["embed_dim"] == 64  # not a released size: every argument given
    for loaded in readme_models(folder):
        assert not loaded.training
        assert_dinov3_features(loaded, model)


@pytest.mark.parametrize("kind", sorted(DINOV3_BACKBONES))
def test_dinoscale_loads_the_dinov3_export_back(tmp_path, kind):
    model = tiny_dinov3(kind)
    export_timm(model, tmp_path / "timm")
    # timm's models always have LayerScale and the attention-output / FFN biases (exported as identities)
    target = {"layerscale_init": 1e-5, "proj_bias": True, "ffn_bias": True} if kind == "swiglu_bare" else {}
    loaded = tiny_dinov3(kind, seed=1, **target)
    assert load_state_dict_any(loaded, tmp_path / "timm") == "timm"
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith(".attn.qkv.bias"):  # the key third is masked: timm keeps none, it comes back as zero
            third = value.shape[0] // 3
            assert torch.equal(state[key][:third], value[:third]) and torch.equal(state[key][2 * third:],
                                                                                   value[2 * third:]), key
            assert not state[key][third : 2 * third].any()
        elif key != "mask_token":  # timm has none: the model keeps its own
            assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert_close_tokens(loaded.forward_features(x)["x_norm_patchtokens"],
                            model.forward_features(x)["x_norm_patchtokens"], atol=1e-5)


DINOV3_NAMES = {
    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb",
    "dinov3_vitl16": "vit_large_patch16_dinov3_qkvb",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3",  # no qkv bias
}


@pytest.mark.parametrize("arch", sorted(DINOV3_NAMES))
def test_released_dinov3_architectures_get_timms_names(arch):
    from dinoscale.export.timm import dinov3_timm_model, dinov3_to_timm
    from dinoscale.models.factory import build_backbone

    with torch.device("meta"):  # full size, no memory (no values either: biases count as present)
        model = build_backbone(arch)
        name, kwargs = dinov3_timm_model(model)
        assert name == DINOV3_NAMES[arch]
        assert kwargs == dict(img_size=224, num_classes=0, global_pool="token")
        reference = timm.create_model(name, pretrained=False, **kwargs)
    ours = dinov3_to_timm(model.state_dict(), qkv_bias=name.endswith("_qkvb"))
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("rope.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == shapes


def test_released_dinov3_with_zero_qkv_biases_gets_the_plain_name_and_vitl16plus_generic_arguments():
    from dinoscale.export.timm import dinov3_timm_model
    from dinoscale.models.factory import build_backbone

    model = build_backbone("dinov3_vits16")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.zero_()
    assert dinov3_timm_model(model) == ("vit_small_patch16_dinov3", dict(img_size=224, num_classes=0,
                                                                         global_pool="token"))
    with torch.device("meta"):  # timm has no ViT-L+: the S+ family with the L+ sizes
        name, kwargs = dinov3_timm_model(build_backbone("dinov3_vitl16plus"))
    assert name == "vit_small_plus_patch16_dinov3_qkvb"
    assert {k: kwargs[k] for k in ("embed_dim", "depth", "num_heads", "num_reg_tokens")} == dict(
        embed_dim=1024, depth=24, num_heads=16, num_reg_tokens=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(untie_cls_and_patch_norms=True), "unties the CLS and patch norms"),
    (dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0), "min/max"),
    (dict(pos_embed_rope_normalize_coords="max"), "normalise RoPE coordinates per axis"),
    (dict(norm_layer="layernorm"), "LayerNorm eps 1e-05"),
    (dict(mask_k_bias=False), "no key bias"),
], ids=["cls_norm", "periods", "coords", "eps", "key_bias"])
def test_what_timm_cannot_build_is_refused_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_timm(tiny_dinov3(**kwargs), tmp_path / "timm")
    assert not (tmp_path / "timm").exists()


def test_the_readme_says_when_timm_recomputes_other_rope_periods(tmp_path):
    model = tiny_dinov3()
    export_timm(model, tmp_path / "exact")
    assert "periods" not in (tmp_path / "exact" / "README.txt").read_text()
    with torch.no_grad():  # what the official files hold: the periods rounded to bf16
        model.rope_embed.periods.copy_(model.rope_embed.periods.bfloat16().float())
    export_timm(model, tmp_path / "rounded")
    assert "timm recomputes them" in (tmp_path / "rounded" / "README.txt").read_text()
