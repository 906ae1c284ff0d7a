"""The named backbones: release hyper-parameters and files, upstream's ``pretrained=`` / ``weights=`` signature,
the released weights from torch.hub's cache or one clear error offline, the random-weights warning, hubconf."""

import dataclasses
import enum
import importlib.util
import inspect
import logging

import pytest
import torch

from dinoscale import hub
from dinoscale.hub import WeightsLoadError, zoo
from dinoscale.models.vit import DinoVisionTransformer
from tests.hub.conftest import REPO_ROOT, TINY_NAMED, assert_same_weights, randomize_

BACKBONES = [f"dinov2_vit{s}14{r}" for r in ("", "_reg") for s in "sblg"]
RELEASE_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"


def no_network(*args, **kwargs):
    raise AssertionError("a download was attempted")


def test_named_constructors_release_hyperparameters():
    with torch.device("meta"):
        small = hub.load("dinov2_vits14")
        reg = hub.load("dinov2_vitl14_reg")
        giant = hub.dinov2_vitg14(pretrained=False)
    assert small.patch_size == 14 and small.pos_embed.shape == (1, 1 + 37 * 37, 384)
    assert (small.interpolate_offset, small.interpolate_antialias, small.num_register_tokens) == (0.1, False, 0)
    assert small.blocks[0].ls1.gamma.shape == (384,)
    assert (reg.embed_dim, reg.n_blocks, reg.num_register_tokens) == (1024, 24, 4)
    assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
    assert giant.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    with pytest.raises(ValueError, match="unknown model 'dinov2_vith14'"):
        hub.load("dinov2_vith14")
    assert hub.official_weights_url("dinov2_vitb14_reg") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    )
    assert hub.MODELS["dinov2_vits14"].weights_url == RELEASE_URL


def test_constructors_have_upstream_signature():
    for name in BACKBONES:
        params = inspect.signature(getattr(hub, name)).parameters
        assert params["pretrained"].default is True and params["pretrained"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["weights"].default is hub.Weights.LVD142M and hub.Weights.LVD142M.name == "LVD142M"
        lc = inspect.signature(getattr(hub, f"{name}_lc")).parameters
        assert (lc["layers"].default, lc["pretrained"].default, lc["weights"].default.name) == (4, True, "IMAGENET1K")


def test_released_weights_offline_are_one_error_naming_url_and_cache_path(offline_hub):
    expected_path = offline_hub / "dinov2_vits14_pretrain.pth"
    calls = [
        lambda: hub.dinov2_vits14(img_size=56),  # pretrained=True by default, as upstream
        lambda: hub.dinov2_vits14(weights="LVD142M", img_size=56),
        lambda: hub.load("dinov2_vits14", weights="official", img_size=56),
        lambda: torch.hub.load(str(REPO_ROOT), "dinov2_vits14", source="local", img_size=56),
    ]
    for call in calls:
        with pytest.raises(WeightsLoadError) as info:
            call()
        message = str(info.value)
        assert f"could not download {RELEASE_URL}" in message
        assert f"put it at {expected_path}" in message
        assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, no chained traceback
    assert list(offline_hub.iterdir()) == []  # nothing half-downloaded left behind


def tiny_release(monkeypatch, name: str) -> None:
    """Make the release ``name`` tiny (same files, same URLs), so its cached file is small."""
    spec = hub.MODELS[name]
    monkeypatch.setitem(hub.MODELS, name, dataclasses.replace(spec, kwargs={**spec.kwargs, **TINY_NAMED}))


def test_released_weights_come_from_torch_hub_cache_without_network(offline_hub, monkeypatch):
    tiny_release(monkeypatch, "dinov2_vits14")
    src = randomize_(hub.dinov2_vits14(pretrained=False))
    offline_hub.mkdir(parents=True)
    torch.save(src.state_dict(), offline_hub / "dinov2_vits14_pretrain.pth")  # where upstream's hub puts it too
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for model in (
        hub.dinov2_vits14(),
        hub.load("dinov2_vits14", weights="official"),
        torch.hub.load(str(REPO_ROOT), "dinov2_vits14", source="local"),
    ):
        assert isinstance(model, DinoVisionTransformer)
        assert_same_weights(model, src)


def test_architecture_overrides_are_refused_before_downloading(offline_hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ValueError, match=r"released weights fit DinoVisionTransformer\(embed_dim=384, depth=12.*"
                                         r"not DinoVisionTransformer\(embed_dim=384, depth=2.*pretrained=False"):
        hub.dinov2_vits14(depth=2)
    with pytest.raises(ValueError, match="ffn=SwiGLUFFN.*ffn=Mlp"):
        hub.load("dinov2_vitg14", weights="official", ffn_layer="mlp")


def test_random_weights_are_said_once_per_process(caplog):
    with caplog.at_level(logging.WARNING, logger="dinoscale.hub"):
        hub.load("dinov2_vits14", **TINY_NAMED)  # no weights: random, as before, but said
        hub.dinov2_vitb14_reg(pretrained=False, **TINY_NAMED)
        hub.load("dinov2_vits14", **TINY_NAMED)
    said = [r for r in caplog.records if "random weights" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    message = said[0].getMessage()
    assert "dinov2_vits14 has random weights" in message
    assert "dinoscale.hub.dinov2_vits14()" in message and "weights='official'" in message
    assert RELEASE_URL in message and str(zoo.url_cache_path(RELEASE_URL)) in message


def test_weights_values(tmp_path):
    src = randomize_(hub.dinov2_vits14(pretrained=False, **TINY_NAMED))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for weights in (str(tmp_path / "w.pth"), tmp_path / "w.pth", src.state_dict()):
        assert_same_weights(hub.dinov2_vits14(weights=weights, **TINY_NAMED), src)
        assert_same_weights(hub.load("dinov2_vits14", weights=weights, **TINY_NAMED), src)

    class UpstreamWeights(enum.Enum):  # as dinov2.hub.backbones.Weights
        LVD142M = "LVD142M"

    for release in (UpstreamWeights.LVD142M, "LVD142M", "official", hub.Weights.LVD142M):
        model = hub.dinov2_vits14(pretrained=False, weights=release, **TINY_NAMED)
        assert isinstance(model, DinoVisionTransformer)
    with pytest.raises(ValueError, match="pretrained=False asks for random weights"):
        hub.dinov2_vits14(pretrained=False, weights=str(tmp_path / "w.pth"), **TINY_NAMED)
    with pytest.raises(FileNotFoundError, match=r"weights='IMAGENET1K' is not an existing file .*'LVD142M', 'offi"):
        hub.dinov2_vits14(weights="IMAGENET1K")  # refused before the model is built or anything downloaded
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        hub.load("dinov2_vits14", weights=str(tmp_path / "nothere.pth"))


def test_upstream_block_chunks_is_accepted():
    # Upstream passes block_chunks to its ViT (blocks grouped for FSDP); the layout here stays flat.
    model = hub.dinov2_vits14(pretrained=False, block_chunks=2, **TINY_NAMED)
    assert "blocks.3.norm1.weight" in model.state_dict() and len(model.blocks) == TINY_NAMED["depth"]


def test_hubconf_lists_upstream_entry_points_and_loads_locally(tmp_path):
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)  # what torch.hub.load(..., source="local") imports
    entry_points = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entry_points == set(BACKBONES) | {f"{n}_lc" for n in BACKBONES} | set(hub.DINOV3_MODELS)
    assert hubconf.dependencies == ["torch", "safetensors"]
    src = randomize_(hub.dinov2_vits14(pretrained=False, img_size=56, depth=2))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = torch.hub.load(str(REPO_ROOT), "dinov2_vits14", source="local", weights=str(tmp_path / "w.pth"),
                           img_size=56, depth=2)
    assert isinstance(model, DinoVisionTransformer)
    assert_same_weights(model, src)
    random = torch.hub.load(str(REPO_ROOT), "dinov2_vits14_reg", source="local", pretrained=False, **TINY_NAMED)
    assert random.num_register_tokens == 4
