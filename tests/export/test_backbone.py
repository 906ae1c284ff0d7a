"""The architecture read off a backbone, and the identity parameters added for the targets."""

import pytest
import torch

from dinoscale import hub
from dinoscale.export.backbone import BackboneSpec, ExportError, backbone_spec, export_state_dict
from tests.export.conftest import BACKBONES, tiny_backbone


def test_spec_of_a_released_architecture():
    with torch.device("meta"):
        model = hub.load("dinov2_vitg14_reg")
    assert backbone_spec(model) == BackboneSpec(
        img_size=518, patch_size=14, in_chans=3, embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu",
        ffn_hidden=4096, num_register_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True, layerscale=True,
        interpolate_offset=0.0, interpolate_antialias=True,
    )


def test_spec_of_a_bare_backbone():
    spec = backbone_spec(tiny_backbone(in_chans=1, **BACKBONES["bare"]))
    assert (spec.in_chans, spec.ffn_layer, spec.ffn_hidden, spec.grid_size) == (1, "swiglu", 64, 4)
    assert not (spec.qkv_bias or spec.proj_bias or spec.ffn_bias or spec.layerscale)


def test_only_a_dinoscale_vit_is_exported():
    with pytest.raises(ExportError, match="DinoVisionTransformer"):
        backbone_spec(torch.nn.Linear(2, 2))


def test_export_state_dict_adds_identity_parameters_only_where_missing():
    full = tiny_backbone(**BACKBONES["registers"])
    state = export_state_dict(full)
    assert state.keys() == full.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in full.state_dict().items())

    bare = tiny_backbone(**BACKBONES["bare"])
    state = export_state_dict(bare)
    added = set(state) - set(bare.state_dict())
    assert added == {
        f"blocks.{i}.{name}" for i in range(2)
        for name in ("ls1.gamma", "ls2.gamma", "attn.proj.bias", "mlp.w12.bias", "mlp.w3.bias")
    }
    assert torch.equal(state["blocks.1.ls2.gamma"], torch.ones(32))
    assert torch.equal(state["blocks.0.mlp.w12.bias"], torch.zeros(128))
    # the function is unchanged: a backbone that has these parameters, set to the identities, computes the same
    twin = tiny_backbone(**dict(BACKBONES["bare"], init_values=1.0, proj_bias=True, ffn_bias=True))
    twin.load_state_dict(state)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(twin.forward_features(x)["x_prenorm"], bare.forward_features(x)["x_prenorm"])
