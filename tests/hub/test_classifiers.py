"""The released linear classifiers (``*_lc``): upstream's head formula computed by hand, upstream-layout head
files, the released files from torch.hub's cache, the offline error, the release URLs."""

import pytest
import torch

from dinoscale import hub
from dinoscale.hub import LinearClassifier, WeightsLoadError
from tests.hub.conftest import REPO_ROOT, TINY_NAMED, assert_same_weights, randomize_
from tests.hub.test_zoo import no_network, tiny_release

TINY_DEEP = {**TINY_NAMED, "depth": 5}  # more blocks than the 4 the head reads


def upstream_head_input(backbone, x: torch.Tensor, layers: int) -> torch.Tensor:
    """By hand: the final-norm CLS token of each of the last ``layers`` blocks, then the mean of the last block's
    final-norm patch tokens (registers excluded); for layers=1 from forward_features, as upstream does."""
    if layers == 1:
        out = backbone.forward_features(x)
        return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)
    tokens, per_block = backbone.prepare_tokens_with_masks(x), []
    for block in backbone.blocks:
        tokens = block(tokens)
        per_block.append(backbone.norm(tokens))
    last = per_block[-layers:]
    patches = last[-1][:, 1 + backbone.num_register_tokens :]
    return torch.cat([*(t[:, 0] for t in last), patches.mean(dim=1)], dim=1)


@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("constructor", ["dinov2_vits14_lc", "dinov2_vits14_reg_lc"])
def test_logits_follow_upstream_formula(constructor, layers):
    model = getattr(hub, constructor)(layers=layers, pretrained=False, **TINY_DEEP)
    model = randomize_(model).eval()
    assert isinstance(model, LinearClassifier) and model.layers == layers
    assert tuple(model.linear_head.weight.shape) == (1000, (1 + layers) * 32)
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        logits = model(x)
        features = upstream_head_input(model.backbone, x, layers)
        expected = features @ model.linear_head.weight.T + model.linear_head.bias
    assert logits.shape == (2, 1000)
    assert (logits - expected).abs().max() <= 1e-5
    assert (model.head_input(x) - features).abs().max() <= 1e-6


def test_state_dict_has_upstream_keys():
    model = hub.dinov2_vits14_lc(pretrained=False, **TINY_NAMED)
    keys = model.state_dict().keys()
    assert {k for k in keys if k.startswith("linear_head.")} == {"linear_head.weight", "linear_head.bias"}
    assert all(k.startswith(("backbone.", "linear_head.")) for k in keys) and "backbone.cls_token" in keys


def test_upstream_layout_head_file_loads(tmp_path):
    backbone = randomize_(hub.dinov2_vits14(pretrained=False, **TINY_NAMED))
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    for layers in (1, 4):
        head = randomize_(torch.nn.Linear((1 + layers) * 32, 1000), seed=layers)
        torch.save(head.state_dict(), tmp_path / f"head{layers}.pth")  # keys: weight, bias (as the released files)
        for weights in (str(tmp_path / f"head{layers}.pth"), head.state_dict()):
            model = hub.dinov2_vits14_lc(layers=layers, weights=weights, backbone_weights=tmp_path / "backbone.pth",
                                         **TINY_NAMED)
            assert_same_weights(model.linear_head, head)
            assert_same_weights(model.backbone, backbone)
    with pytest.raises(WeightsLoadError, match=r"head1\.pth as a linear head over 4 block\(s\).*pass layers=1"):
        hub.dinov2_vits14_lc(weights=str(tmp_path / "head1.pth"), backbone_weights=tmp_path / "backbone.pth",
                             **TINY_NAMED)
    with pytest.raises(WeightsLoadError, match="expected .*'weight': \\(1000, 160\\).*found .*'blocks"):
        hub.dinov2_vits14_lc(weights=tmp_path / "backbone.pth", backbone_weights=tmp_path / "backbone.pth",
                             **TINY_NAMED)


def test_release_urls():
    assert hub.MODELS["dinov2_vits14"].linear_head_url(4) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_linear4_head.pth"
    )
    assert hub.MODELS["dinov2_vitg14_reg"].linear_head_url(1) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_linear_head.pth"
    )
    with pytest.raises(ValueError, match="layers=2"):
        hub.dinov2_vits14_lc(layers=2, pretrained=False)


def test_released_classifier_from_torch_hub_cache(offline_hub, monkeypatch):
    tiny_release(monkeypatch, "dinov2_vits14_reg")
    backbone = randomize_(hub.dinov2_vits14_reg(pretrained=False))
    offline_hub.mkdir(parents=True)
    torch.save(backbone.state_dict(), offline_hub / "dinov2_vits14_reg4_pretrain.pth")
    heads = {layers: randomize_(torch.nn.Linear((1 + layers) * 32, 1000), seed=layers) for layers in (1, 4)}
    torch.save(heads[1].state_dict(), offline_hub / "dinov2_vits14_reg4_linear_head.pth")
    torch.save(heads[4].state_dict(), offline_hub / "dinov2_vits14_reg4_linear4_head.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for layers, model in [
        (4, hub.dinov2_vits14_reg_lc()),
        (1, hub.dinov2_vits14_reg_lc(layers=1, weights="IMAGENET1K")),
        (4, torch.hub.load(str(REPO_ROOT), "dinov2_vits14_reg_lc", source="local")),
    ]:
        assert_same_weights(model.backbone, backbone)
        assert_same_weights(model.linear_head, heads[layers])
        assert model(torch.randn(1, 3, 56, 56)).shape == (1, 1000)


def test_released_head_offline_is_one_error_naming_url_and_cache_path(offline_hub, monkeypatch):
    tiny_release(monkeypatch, "dinov2_vits14_reg")
    offline_hub.mkdir(parents=True)
    torch.save(hub.dinov2_vits14_reg(pretrained=False).state_dict(), offline_hub / "dinov2_vits14_reg4_pretrain.pth")
    with pytest.raises(WeightsLoadError) as info:
        hub.dinov2_vits14_reg_lc(layers=1)
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_linear_head.pth"
    assert f"could not download {url}" in str(info.value)
    assert f"put it at {offline_hub / 'dinov2_vits14_reg4_linear_head.pth'}" in str(info.value)
    with pytest.raises(ValueError, match="released head reads width 384, not embed_dim=48"):
        hub.dinov2_vits14_lc(backbone_weights=None, embed_dim=48, num_heads=2)  # refused before downloading
