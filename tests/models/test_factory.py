import pytest
import torch
from omegaconf import OmegaConf

from dinoscale.config import load_config
from dinoscale.models.factory import ARCHS, backbone_kwargs, build_backbone


def test_config_and_arch_name_build_the_same_backbone():
    model_cfg = load_config("quickstart").model
    torch.manual_seed(0)
    from_config = build_backbone(model_cfg, drop_path_rate=0.1)
    torch.manual_seed(0)
    from_name = build_backbone(model_cfg.arch, **backbone_kwargs(model_cfg), drop_path_rate=0.1)
    assert from_config.state_dict().keys() == from_name.state_dict().keys()
    assert all(torch.equal(v, from_name.state_dict()[k]) for k, v in from_config.state_dict().items())
    assert from_config.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert from_config.patch_size == model_cfg.patch_size


def test_config_sizes_override_the_architecture_only_when_set():
    model_cfg = OmegaConf.merge(load_config("quickstart").model, {"arch": "vit_giant2", "embed_dim": None,
                                                                 "depth": 2, "num_heads": None})
    with torch.device("meta"):
        model = build_backbone(model_cfg)
    assert (model.embed_dim, model.n_blocks, model.num_heads) == (1536, 2, 24)
    # the config's ffn_layer wins over the architecture's SwiGLU
    assert model_cfg.ffn_layer == "mlp" and hasattr(model.blocks[0].mlp, "fc1")


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown arch 'vit_tiny'; choose one of \['vit_base'"):
        build_backbone("vit_tiny")
    model_cfg = OmegaConf.merge(load_config("quickstart").model, {"arch": "vit_tiny"})
    with pytest.raises(ValueError, match=r"unknown model.arch 'vit_tiny'"):
        build_backbone(model_cfg)
    assert sorted(ARCHS) == ["vit_base", "vit_giant2", "vit_large", "vit_small"]
