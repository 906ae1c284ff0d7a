"""timm export: the README's load snippets build a timm model whose forward_features are our features;
standard architectures get timm's own names; dinoscale loads the weights back."""

import json
import re

import pytest
import timm
import torch

from dinoscale import hub
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
