"""The named DINOv3 backbones: every release name builds with the release architecture, the released weights
come from torch.hub's cache only (Meta's signed URLs) with one clear error naming the path otherwise, weights of
any layout load, and hubconf / load_backbone expose the names."""

import importlib.util
import inspect

import pytest
import torch

from dinoscale import hub
from dinoscale.eval.backbones import load_backbone
from dinoscale.hub import WeightsLoadError, zoo
from dinoscale.models.factory import DINOV3_ARCHS
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
from tests.hub.conftest import REPO_ROOT, assert_same_weights, randomize_

NAMES = ["dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16plus",
         "dinov3_vith16plus", "dinov3_vit7b16"]
TINY = dict(embed_dim=64, depth=1, num_heads=4)


def test_every_release_builds_with_its_architecture():
    assert list(hub.DINOV3_MODELS) == NAMES
    for name in NAMES:
        with torch.device("meta"):
            model = hub.load(name)
            entry = getattr(hub, name)(pretrained=False)
        assert isinstance(model, DinoV3VisionTransformer) and isinstance(entry, DinoV3VisionTransformer)
        release = DINOV3_ARCHS[name]
        assert (model.embed_dim, model.n_blocks, model.num_heads) == (
            release["embed_dim"], release["depth"], release["num_heads"])
        assert entry.state_dict().keys() == model.state_dict().keys()
    small = hub.load("dinov3_vits16", **TINY)  # real tensors, overridden sizes
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_release_file_names():
    # upstream's names: dinov3_<arch>_pretrain_<data>-<hash>.pth (dinov3/hub/backbones.py)
    assert hub.DINOV3_MODELS["dinov3_vits16"].file_name("LVD1689M") == "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    assert hub.DINOV3_MODELS["dinov3_vit7b16"].file_name("SAT493M") == "dinov3_vit7b16_pretrain_sat493m-a6675841.pth"
    assert hub.DINOV3_MODELS["dinov3_vith16plus"].file_name("LVD1689M") == (
        "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth")
    with pytest.raises(ValueError, match=r"released with weights \['LVD1689M'\], not 'SAT493M'"):
        hub.load("dinov3_vitb16", weights="SAT493M")


@pytest.mark.parametrize("name", NAMES)
def test_official_weights_without_the_file_is_one_clear_error(name, offline_hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("a download was attempted"))
    path = offline_hub / hub.DINOV3_MODELS[name].file_name("LVD1689M")
    for call in (lambda: hub.load(name, weights="official"), lambda: getattr(hub, name)(),
                 lambda: getattr(hub, name)(weights=hub.Dinov3Weights.LVD1689M)):
        with pytest.raises(WeightsLoadError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and hub.DINOV3_DOWNLOAD_PAGE in message and "signed URL" in message


def test_official_weights_from_the_cache(offline_hub):
    torch.manual_seed(0)
    released = randomize_(hub.load("dinov3_vits16plus", **TINY))
    offline_hub.mkdir(parents=True)
    torch.save(released.state_dict(), offline_hub / hub.DINOV3_MODELS["dinov3_vits16plus"].file_name("LVD1689M"))
    for model in (hub.load("dinov3_vits16plus", weights="official", **TINY), hub.dinov3_vits16plus(**TINY),
                  hub.dinov3_vits16plus(weights="LVD1689M", check_hash=True, **TINY)):
        assert_same_weights(model, released)


def test_local_cls_norm_in_the_weights_unties_the_norm(tmp_path):
    # the satellite ViT-L holds local_cls_norm, as upstream's hub builds it for those weights
    torch.manual_seed(0)
    sat = randomize_(hub.load("dinov3_vitl16", untie_global_and_local_cls_norm=True, **TINY))
    torch.save(sat.state_dict(), tmp_path / "sat.pth")
    model = hub.load("dinov3_vitl16", weights=tmp_path / "sat.pth", **TINY)
    assert model.local_cls_norm is not None
    assert_same_weights(model, sat)
    # Hugging Face / timm weights of the 7B hold none: the model keeps its own (training only)
    seven = hub.load("dinov3_vit7b16", **TINY)
    plain = {k: v for k, v in seven.state_dict().items() if not k.startswith("local_cls_norm")}
    assert hub.load("dinov3_vit7b16", weights=plain, **TINY).local_cls_norm is not None


def test_random_weights_are_said(caplog):
    with caplog.at_level("WARNING"):
        hub.dinov3_vitb16(pretrained=False, **TINY)
    assert "random weights" in caplog.text and hub.DINOV3_DOWNLOAD_PAGE in caplog.text
    with pytest.raises(ValueError, match="pretrained=False asks for random weights"):
        hub.dinov3_vitb16(pretrained=False, weights={"a": torch.zeros(1)})


def test_entry_points_have_upstream_signature_and_hubconf_lists_them(tmp_path):
    for name in NAMES:
        params = inspect.signature(getattr(hub, name)).parameters
        assert params["pretrained"].default is True and params["pretrained"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["weights"].default is hub.Dinov3Weights.LVD1689M and params["check_hash"].default is False
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for name in NAMES:
        assert getattr(hubconf, name) is getattr(hub, name)
    torch.manual_seed(0)
    src = randomize_(hub.dinov3_vits16(pretrained=False, **TINY))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = torch.hub.load(str(REPO_ROOT), "dinov3_vits16", source="local", weights=str(tmp_path / "w.pth"), **TINY)
    assert_same_weights(model, src)


def test_load_backbone_and_attention_maps_skip_the_storage_tokens(tmp_path):
    from dinoscale.eval.linear import _intermediate_forward
    from dinoscale.viz.attention import attention_maps

    torch.manual_seed(0)
    weights = randomize_(hub.load("dinov3_vits16", **TINY))
    torch.save(weights.state_dict(), tmp_path / "w.pth")
    model = load_backbone("dinov3_vits16", str(tmp_path / "w.pth"), model_kwargs=TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    image = torch.randn(3, 48, 64)
    maps = attention_maps(model, image)
    assert maps.shape == (4, 3, 4)
    attn = model.get_last_selfattention(image[None])
    torch.testing.assert_close(maps, attn[0, :, 0, 5:].reshape(4, 3, 4))
    features = _intermediate_forward(1)(model, image[None])
    torch.testing.assert_close(features["cls_blocks"][:, 0], model(image[None]))
    assert load_backbone("dinov3_vitb16", model_kwargs=TINY).embed_dim == 64
    with pytest.raises(ValueError, match="dinov3_vit7b16"):
        load_backbone("dinov3_vitz16")


def test_zoo_module_tables_agree():
    assert set(zoo.DINOV3_MODELS) == set(DINOV3_ARCHS)
