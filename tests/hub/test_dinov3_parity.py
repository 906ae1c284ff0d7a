"""The DINOv3 ViT against the reference implementations: transformers' DINOv3ViTModel and timm's
vit_*_patch16_dinov3, random tiny models of both, their state dicts converted by load_state_dict_any, the
features compared in fp32 at several resolutions (square and not)."""

import pytest
import timm
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dinoscale.hub import load_state_dict_any
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
from tests.hub.conftest import randomize_

SIZES = [(32, 32), (48, 48), (64, 48)]
# float32 rounding of one function computed in another order (our CPU patch embedding is a matmul, timm's a
# convolution), relative to the features' magnitude (up to ~7 here); a wrong bias, RoPE or norm is off by 0.1-1
ATOL = 1e-5


def ours(ffn_layer: str, ffn_ratio: float, **kwargs) -> DinoV3VisionTransformer:
    params = dict(embed_dim=64, depth=2, num_heads=4, ffn_ratio=ffn_ratio, ffn_layer=ffn_layer, n_storage_tokens=4,
                  mask_k_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16")
    return DinoV3VisionTransformer(**{**params, **kwargs}).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the reference's largest magnitude where that is above 1."""
    assert a.shape == b.shape
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_features_equal_transformers_dinov3(gated):
    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4, image_size=32,
        intermediate_size=128 if gated else 256, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        layerscale_value=1e-5, layer_norm_eps=1e-5, rope_theta=100.0,
    )
    hf = randomize_(DINOv3ViTModel(config)).eval()
    model = ours("swiglu64" if gated else "mlp", 3 if gated else 4)
    assert load_state_dict_any(model, hf.state_dict()) == "huggingface"
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf(x)
            out = model.forward_features(x)
            (patch_map,) = model.get_intermediate_layers(x, n=1, reshape=True)
        assert max_diff(out["x_norm_clstoken"], ref.pooler_output) < ATOL, size
        assert max_diff(out["x_storage_tokens"], ref.last_hidden_state[:, 1:5]) < ATOL, size
        assert max_diff(out["x_norm_patchtokens"], ref.last_hidden_state[:, 5:]) < ATOL, size
        assert patch_map.shape == (2, 64, size[0] // 16, size[1] // 16)
        assert max_diff(patch_map.flatten(2).transpose(1, 2), ref.last_hidden_state[:, 5:]) < ATOL


def test_masked_tokens_equal_transformers_dinov3():
    torch.manual_seed(1)
    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_register_tokens=4,
                             intermediate_size=256, layerscale_value=1e-5)
    hf = randomize_(DINOv3ViTModel(config)).eval()
    model = ours("mlp", 4, depth=1)
    load_state_dict_any(model, hf.state_dict())
    x, masks = torch.randn(2, 3, 48, 32), torch.rand(2, 6) > 0.5
    with torch.no_grad():
        ref = hf(x, bool_masked_pos=masks).last_hidden_state
        out = model.forward_features(x, masks=masks)
    assert max_diff(out["x_norm_patchtokens"], ref[:, 5:]) < ATOL


# timm name, our ffn_layer and ffn_ratio (timm's mlp_ratio is the SwiGLU width before rounding: 2/3 of ours),
# and whether timm's model has the q/v biases (the *_qkvb variants; the others load as zero biases)
TIMM_MODELS = [
    ("vit_small_patch16_dinov3_qkvb", "mlp", 4),
    ("vit_small_patch16_dinov3", "mlp", 4),
    ("vit_small_plus_patch16_dinov3_qkvb", "swiglu", 6),
    ("vit_7b_patch16_dinov3", "swiglu64", 3),
]


@pytest.mark.parametrize("name,ffn_layer,ffn_ratio", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_features_and_intermediates_equal_timm_dinov3(name, ffn_layer, ffn_ratio):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, embed_dim=64, depth=3, num_heads=4, img_size=32,
                                  num_classes=0)
    reference = randomize_(reference).eval()
    model = ours(ffn_layer, ffn_ratio, depth=3)
    assert load_state_dict_any(model, reference.state_dict()) == "timm"
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = reference.forward_features(x)
            out = model.forward_features(x)
            ref_layers = reference.forward_intermediates(x, indices=2, norm=True, output_fmt="NCHW",
                                                         intermediates_only=True, return_prefix_tokens=True)
            layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True,
                                                   return_extra_tokens=True)
            raw_ref = reference.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
            raw = model.get_intermediate_layers(x, n=[0], norm=False)
        assert max_diff(out["x_norm_clstoken"], ref[:, 0]) < ATOL, size
        assert max_diff(out["x_storage_tokens"], ref[:, 1:5]) < ATOL, size
        assert max_diff(out["x_norm_patchtokens"], ref[:, 5:]) < ATOL, size
        assert len(layers) == len(ref_layers) == 2
        for (patches, cls, extra), (ref_patches, ref_prefix) in zip(layers, ref_layers):
            assert max_diff(patches, ref_patches) < ATOL
            assert max_diff(torch.cat((cls[:, None], extra), dim=1), ref_prefix) < ATOL
        assert max_diff(raw[0], raw_ref[0]) < ATOL
