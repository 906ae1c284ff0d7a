"""DINOv3 state-dict layouts: our names are the official .pth names (the list below is written from
facebookresearch/dinov3's vision_transformer.py and layers/), Hugging Face and timm state dicts convert to them,
the conversion to Hugging Face's names round-trips, and the layout is detected from the keys."""

import pytest
import timm
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dinoscale.hub import (
    WeightsLoadError,
    convert_to_dinov3,
    detect_dinov3_layout,
    dinov3_to_hf,
    hf_to_dinov3,
    load_state_dict_any,
)
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
from tests.hub.conftest import randomize_, tiny


def official_keys(depth: int, dim: int, hidden: int, storage: int, swiglu: bool, qkv_bias: bool,
                  local_cls_norm: bool = False) -> dict[str, tuple[int, ...]]:
    """The official DINOv3 state dict of a ViT of these sizes (patch 16, 4 heads): names and shapes."""
    keys = {"cls_token": (1, 1, dim), "mask_token": (1, dim), "rope_embed.periods": (dim // 4 // 4,),
            "patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if storage:
        keys["storage_tokens"] = (1, storage, dim)
    if local_cls_norm:
        keys.update({"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)})
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,),
                     b + "norm2.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,)})
        if qkv_bias:
            keys.update({b + "attn.qkv.bias": (3 * dim,), b + "attn.qkv.bias_mask": (3 * dim,)})
        if swiglu:
            keys.update({b + "mlp.w1.weight": (hidden, dim), b + "mlp.w1.bias": (hidden,),
                         b + "mlp.w2.weight": (hidden, dim), b + "mlp.w2.bias": (hidden,),
                         b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
        else:
            keys.update({b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
    return keys


def ours(**kwargs) -> DinoV3VisionTransformer:
    params = dict(embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4, mask_k_bias=True, layerscale_init=1e-5,
                  norm_layer="layernormbf16")
    return DinoV3VisionTransformer(**{**params, **kwargs}).eval()


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_our_names_and_shapes_are_the_official_layout():
    assert shapes(ours().state_dict()) == official_keys(2, 64, 256, 4, swiglu=False, qkv_bias=True)
    # the ViT-S+/H+ style: SwiGLU rounded to 8 (64 * 6 * 2/3 = 256)
    assert shapes(ours(ffn_layer="swiglu", ffn_ratio=6).state_dict()) == official_keys(
        2, 64, 256, 4, swiglu=True, qkv_bias=True)
    # the 7B style: no qkv bias (so no bias_mask), SwiGLU rounded to 64 (64 * 3 * 2/3 = 128), local_cls_norm
    seven = ours(ffn_layer="swiglu64", ffn_ratio=3, qkv_bias=False, untie_global_and_local_cls_norm=True)
    assert shapes(seven.state_dict()) == official_keys(2, 64, 128, 4, swiglu=True, qkv_bias=False,
                                                       local_cls_norm=True)
    assert shapes(ours(n_storage_tokens=0).state_dict()) == official_keys(2, 64, 256, 0, swiglu=False, qkv_bias=True)


def hf_model(gated: bool, seed: int = 0) -> DINOv3ViTModel:
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4,
                             intermediate_size=128 if gated else 256, use_gated_mlp=gated,
                             hidden_act="silu" if gated else "gelu", layerscale_value=1e-5)
    return randomize_(DINOv3ViTModel(config)).eval()


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_hf_converted_to_official_names_loads_strictly(gated):
    hf = hf_model(gated)
    converted = hf_to_dinov3(hf.state_dict())
    # What the official files hold besides: the RoPE periods base ** (4k / head_dim) and the key-bias mask
    # (1, 0, 1 over the q, k, v thirds), both functions of the architecture.
    converted["rope_embed.periods"] = torch.tensor([100.0 ** (4 * k / 16) for k in range(4)])
    for i in range(2):
        converted[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat((torch.ones(64), torch.zeros(64), torch.ones(64)))
    model = ours(ffn_layer="swiglu64", ffn_ratio=3) if gated else ours()
    assert shapes(converted) == shapes(model.state_dict())
    model.load_state_dict(converted, strict=True)
    sd = hf.state_dict()
    k = "model.layer.1.attention."
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight,
                               torch.cat([sd[k + "q_proj.weight"], sd[k + "k_proj.weight"], sd[k + "v_proj.weight"]]))
    assert model.blocks[1].attn.qkv.bias[64:128].eq(0).all()  # HF has no key bias (key_bias=False)
    assert torch.equal(model.mask_token[0], sd["embeddings.mask_token"][0, 0])


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_hf_to_ours_to_hf_round_trip(gated):
    hf = hf_model(gated, seed=3)
    model = ours(ffn_layer="swiglu64", ffn_ratio=3) if gated else ours()
    load_state_dict_any(model, hf.state_dict())
    back = dinov3_to_hf(model.state_dict())
    # the Hub files' names: layer.<i>. (transformers >= 5 renames them to model.layer.<i>. in memory)
    original = {k.replace("model.layer.", "layer."): v for k, v in hf.state_dict().items()}
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    again = ours(ffn_layer="swiglu64", ffn_ratio=3) if gated else ours()
    assert load_state_dict_any(again, back) == "huggingface"
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_hf_save_pretrained_folder_loads(tmp_path):
    hf = hf_model(gated=True, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    model = ours(ffn_layer="swiglu64", ffn_ratio=3)
    assert load_state_dict_any(model, tmp_path / "hf") == "huggingface"
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).pooler_output, atol=1e-5, rtol=0)


def test_official_round_trip_and_training_checkpoint():
    torch.manual_seed(0)
    source = randomize_(ours(ffn_layer="swiglu", ffn_ratio=6))
    state = source.state_dict()
    assert detect_dinov3_layout(state) == "dinov3"
    for checkpoint in (state, {"teacher": {f"backbone.{k}": v for k, v in state.items()},
                               "student": {f"backbone.{k}": v + 1 for k, v in state.items()}}):
        target = ours(ffn_layer="swiglu", ffn_ratio=6)
        assert load_state_dict_any(target, checkpoint) == "dinov3"
        for key, value in state.items():
            assert torch.equal(target.state_dict()[key], value), key


def test_timm_without_qkv_bias_loads_as_zero_bias():
    reference = timm.create_model("vit_small_patch16_dinov3", pretrained=False, embed_dim=64, depth=2, num_heads=4,
                                  num_classes=0)
    converted, layout = convert_to_dinov3(reference.state_dict())
    assert layout == "timm" and "storage_tokens" in converted and "blocks.0.ls1.gamma" in converted
    assert not any(k.endswith("qkv.bias") for k in converted)
    model = ours()
    load_state_dict_any(model, reference.state_dict())
    assert model.blocks[0].attn.qkv.bias.eq(0).all()
    assert model.blocks[0].attn.qkv.bias_mask.tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64


def test_layout_detection():
    assert detect_dinov3_layout(hf_model(False).state_dict()) == "huggingface"
    assert detect_dinov3_layout({k.replace("model.layer.", "layer."): v
                                 for k, v in hf_model(False).state_dict().items()}) == "huggingface"
    qkvb = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, embed_dim=64, depth=1, num_heads=4)
    assert detect_dinov3_layout(qkvb.state_dict()) == "timm"
    assert detect_dinov3_layout(ours().state_dict()) == "dinov3"


def test_dinov2_weights_into_a_dinov3_model_name_the_mismatch():
    with pytest.raises(WeightsLoadError, match=r"DinoV3VisionTransformer.*\n  missing keys.*storage_tokens"):
        load_state_dict_any(ours(), tiny(embed_dim=64, num_heads=4, patch_size=16, img_size=64).state_dict())


def test_untied_cls_norm_has_no_hf_name():
    with pytest.raises(WeightsLoadError, match="cls_norm"):
        dinov3_to_hf(ours(untie_cls_and_patch_norms=True).state_dict())
