"""The DINOv3 ViT: RoPE (formula, coordinate normalisation, training-only augmentations), the masked key bias,
SwiGLU widths, untied norms, multi-crop and masks, get_intermediate_layers, the released architectures (the 7B
on the meta device) and the factory names. Parity with transformers and timm is in tests/hub/test_dinov3_parity.py."""

import math

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.models.attention import MaskedKeyBiasLinear, apply_rope
from dinoscale.models.factory import DINOV3_ARCHS, backbone_kwargs, build_backbone
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer, RopePositionEmbedding, swiglu_hidden_features


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**kwargs) -> DinoV3VisionTransformer:
    params = dict(embed_dim=32, depth=2, num_heads=2, n_storage_tokens=4, mask_k_bias=True, layerscale_init=0.5,
                  norm_layer="layernormbf16", pos_embed_rope_rescale_coords=2.0)
    params.update(kwargs)
    torch.manual_seed(0)
    return DinoV3VisionTransformer(**params).eval()


def test_rope_angles_follow_the_formula():
    # head_dim 16: 4 periods base**(4k/16); patch (i, j) of an H x W grid at 2 * ((i + .5) / H, (j + .5) / W) - 1
    rope = RopePositionEmbedding(32, num_heads=2, base=100.0).eval()
    periods = torch.tensor([100.0 ** (4 * k / 16) for k in range(4)])
    torch.testing.assert_close(rope.periods, periods)
    sin, cos = rope(H=2, W=3)
    assert sin.shape == cos.shape == (6, 16)
    i, j = 1, 2  # token 1 * 3 + 2
    y, x = 2 * (i + 0.5) / 2 - 1, 2 * (j + 0.5) / 3 - 1
    half = [2 * math.pi * y / p for p in periods] + [2 * math.pi * x / p for p in periods]
    torch.testing.assert_close(sin[5], torch.sin(torch.tensor(half * 2)))
    torch.testing.assert_close(cos[5], torch.cos(torch.tensor(half * 2)))


def test_rope_min_max_periods_and_normalisation():
    rope = RopePositionEmbedding(64, num_heads=2, base=None, min_period=0.5, max_period=20.0)
    torch.testing.assert_close(rope.periods, torch.tensor([0.5 * 40 ** (k / 7) for k in range(8)]))
    with pytest.raises(ValueError, match="either a base or both"):
        RopePositionEmbedding(64, num_heads=2, base=100.0, min_period=0.5, max_period=20.0)
    with pytest.raises(ValueError, match="either a base or both"):
        RopePositionEmbedding(64, num_heads=2, base=None, min_period=0.5)
    with pytest.raises(ValueError, match="divisible by 4"):
        RopePositionEmbedding(36, num_heads=2)
    # "max": both axes divided by max(H, W), so a 2 x 4 grid's rows stay in [-1, 0]
    coords = {mode: RopePositionEmbedding(32, 2, normalize_coords=mode).eval()._coords(2, 4)
              for mode in ("separate", "min", "max")}
    assert coords["separate"][:, 0].unique().tolist() == [-0.5, 0.5]
    assert coords["max"][:, 0].unique().tolist() == [-0.75, -0.25] and coords["max"][:, 1].max() == 0.75
    assert coords["min"][:, 1].max() == 2 * 3.5 / 2 - 1


def test_rope_augmentations_only_in_training():
    model = tiny(pos_embed_rope_shift_coords=0.1, pos_embed_rope_jitter_coords=1.5)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.forward_features(x)["x_norm_clstoken"]
        torch.manual_seed(2)
        b = model.forward_features(x)["x_norm_clstoken"]
        # the same function without any augmentation option: eval ignores them entirely
        plain = tiny()
        plain.load_state_dict(model.state_dict())
        c = plain.forward_features(x)["x_norm_clstoken"]
        model.train()
        torch.manual_seed(1)
        d = model.forward_features(x)["x_norm_clstoken"]
        torch.manual_seed(2)
        e = model.forward_features(x)["x_norm_clstoken"]
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(d, a, atol=1e-4) and not torch.allclose(d, e, atol=1e-4)
    # each augmentation alone moves the coordinates in training and never in eval
    for option in ("shift_coords", "jitter_coords", "rescale_coords"):
        rope = RopePositionEmbedding(32, 2, **{option: 2.0})
        rope.train()
        assert not torch.equal(rope._coords(3, 3), RopePositionEmbedding(32, 2)._coords(3, 3)), option
        rope.eval()
        assert torch.equal(rope._coords(3, 3), RopePositionEmbedding(32, 2)._coords(3, 3)), option


def test_rope_dtype_option():
    model = tiny(pos_embed_rope_dtype="bf16")
    assert model.rope_embed.periods.dtype == torch.bfloat16
    assert model.rope_embed(H=2, W=2)[0].dtype == torch.bfloat16
    out = model.forward_features(torch.randn(1, 3, 32, 32))["x_norm_clstoken"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="pos_embed_rope_dtype"):
        tiny(pos_embed_rope_dtype="fp64")


def test_rope_rotates_the_patch_tokens_only():
    q, k = torch.randn(2, 2, 1 + 4 + 6, 16), torch.randn(2, 2, 1 + 4 + 6, 16)
    sin, cos = RopePositionEmbedding(32, 2).eval()(H=2, W=3)
    rq, rk = apply_rope(q, k, (sin, cos))
    assert torch.equal(rq[:, :, :5], q[:, :, :5]) and torch.equal(rk[:, :, :5], k[:, :, :5])
    # a rotation: norms kept, and q.k of two patches depends on their positions only through the angle difference
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    half = torch.cat((-q[..., 8:], q[..., :8]), dim=-1)
    torch.testing.assert_close(rq[:, :, 5:], q[:, :, 5:] * cos + half[:, :, 5:] * sin)
    model = tiny(layerscale_init=1.0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(std=0.5)  # sharp attention (the init's is almost uniform)
        out = model.forward_features(x)["x_norm_patchtokens"]
        model.rope_embed.periods.fill_(1e12)  # angles ~0: sin 0, cos 1, no rotation
        unrotated = model.forward_features(x)["x_norm_patchtokens"]
    assert not torch.allclose(out, unrotated, atol=1e-3)


def test_masked_key_bias():
    linear = MaskedKeyBiasLinear(4, 12)
    assert linear.bias_mask.tolist() == [1.0] * 4 + [0.0] * 4 + [1.0] * 4
    with torch.no_grad():
        linear.bias.fill_(3.0)
    out = linear(torch.zeros(1, 12 // 3))
    assert out[0, 4:8].abs().max() == 0 and (out[0, :4] == 3).all() and (out[0, 8:] == 3).all()
    assert "bias_mask" in dict(linear.named_buffers()) and "bias_mask" in linear.state_dict()
    assert MaskedKeyBiasLinear(4, 12, bias=False).bias_mask is None


def test_swiglu_hidden_width_rounding():
    # int(h * 2 / 3) rounded up to align_to: the 7B's 4096 * 3 -> 8192 (align 64), S+'s 384 * 6 -> 1536
    assert swiglu_hidden_features(4096 * 3, 64) == 8192
    assert swiglu_hidden_features(384 * 6, 8) == 1536
    assert swiglu_hidden_features(100, 64) == 128 and swiglu_hidden_features(100, 8) == 72
    model = tiny(ffn_layer="swiglu64", ffn_ratio=3)
    assert model.blocks[0].mlp.w1.weight.shape == (64, 32) and model.blocks[0].mlp.w3.weight.shape == (32, 64)


def test_outputs_multicrop_and_masks():
    model = tiny()
    g, l = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model.forward_features(g)
        both = model.forward_features([g, l])
        alone = model.forward_features(l)
    assert out["x_norm_clstoken"].shape == (2, 32) and out["x_storage_tokens"].shape == (2, 4, 32)
    assert out["x_norm_patchtokens"].shape == (2, 4, 32) and out["x_prenorm"].shape == (2, 9, 32)
    assert out["x_norm_regtokens"] is out["x_storage_tokens"]
    torch.testing.assert_close(both[0]["x_norm_clstoken"], out["x_norm_clstoken"], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1]["x_norm_patchtokens"], alone["x_norm_patchtokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(g), out["x_norm_clstoken"])
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1] = True
    with torch.no_grad():
        model.mask_token.normal_()
        masked = model.forward_features(g, masks=masks)
    assert masked["masks"] is masks
    assert not torch.allclose(masked["x_prenorm"][0], out["x_prenorm"][0])
    torch.testing.assert_close(masked["x_prenorm"][1], out["x_prenorm"][1])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.forward_features(torch.randn(1, 3, 30, 32))


def test_untied_norms():
    model = tiny(untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        for norm, scale in ((model.norm, 1.0), (model.cls_norm, 2.0), (model.local_cls_norm, 3.0)):
            norm.weight.fill_(scale)
            norm.bias.zero_()
    g, l = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model.forward_features([g, l])
        ref = torch.nn.functional.layer_norm(out[0]["x_prenorm"], (32,), eps=1e-5)
        torch.testing.assert_close(out[0]["x_norm_clstoken"], 2 * ref[:, 0])
        torch.testing.assert_close(out[0]["x_norm_patchtokens"], ref[:, 5:])
        # local_cls_norm: training only, the second batch of a list
        ref_l = torch.nn.functional.layer_norm(out[1]["x_prenorm"], (32,), eps=1e-5)
        torch.testing.assert_close(out[1]["x_norm_clstoken"], 2 * ref_l[:, 0])
        model.train()
        train = model.forward_features([g, l])
        ref_l = torch.nn.functional.layer_norm(train[1]["x_prenorm"], (32,), eps=1e-5)
        torch.testing.assert_close(train[1]["x_storage_tokens"], 3 * ref_l[:, 1:5])
        model.eval()
        ((patches, cls, extra),) = model.get_intermediate_layers(g, n=1, return_class_token=True,
                                                                 return_extra_tokens=True)
    torch.testing.assert_close(cls, 2 * ref[:, 0])
    torch.testing.assert_close(extra, 2 * ref[:, 1:5])


def test_get_intermediate_layers():
    model = tiny(depth=3)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model.forward_features(x)
        last = model.get_intermediate_layers(x)
        two = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True,
                                           return_extra_tokens=True)
        raw = model.get_intermediate_layers(x, 1, norm=False)
    assert len(last) == 1 and len(two) == 2 and len(two[0]) == 3
    torch.testing.assert_close(last[0], out["x_norm_patchtokens"])
    patches, cls, extra = two[1]
    assert patches.shape == (2, 32, 2, 3)
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), out["x_norm_patchtokens"])
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    torch.testing.assert_close(extra, out["x_storage_tokens"])
    torch.testing.assert_close(raw[0], out["x_prenorm"][:, 5:])
    assert len(model.get_intermediate_layers(x, n=2, return_class_token=True)[0]) == 2


def test_last_selfattention_reproduces_the_block():
    model = tiny()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
    assert attn.shape == (1, 2, 1 + 4 + 6, 1 + 4 + 6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 11))


def test_optimizer_metadata_and_init():
    model = tiny()
    nwd = model.no_weight_decay()
    assert {"cls_token", "storage_tokens", "mask_token", "blocks.0.ls1.gamma", "norm.weight"} <= nwd
    assert "blocks.0.attn.qkv.weight" not in nwd and "patch_embed.proj.weight" not in nwd
    assert model.layer_id("storage_tokens") == 0 and model.layer_id("blocks.1.mlp.fc1.weight") == 2
    assert model.layer_id("norm.weight") == 3
    with torch.device("meta"):
        meta = tiny()
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert meta.blocks[0].attn.qkv.bias_mask.tolist() == model.blocks[0].attn.qkv.bias_mask.tolist()
    torch.testing.assert_close(meta.rope_embed.periods, model.rope_embed.periods)
    assert meta.blocks[0].ls1.gamma.eq(0.5).all()


def test_released_architectures():
    # embed dims, depths, heads, FFNs of dinov3/hub/backbones.py; parameter counts of dinov3's README
    # (21M, 29M, 86M, 300M, 840M, 6,716M)
    expected = {
        "dinov3_vits16": (384, 12, 6, "fc1", 1536, 21.6),
        "dinov3_vits16plus": (384, 12, 6, "w1", 1536, 28.7),
        "dinov3_vitb16": (768, 12, 12, "fc1", 3072, 85.7),
        "dinov3_vitl16": (1024, 24, 16, "fc1", 4096, 303.2),
        "dinov3_vitl16plus": (1024, 24, 16, "w1", 4096, 403.9),
        "dinov3_vith16plus": (1280, 32, 20, "w1", 5120, 840.6),
        "dinov3_vit7b16": (4096, 40, 32, "w1", 8192, 6716.0),
    }
    assert set(DINOV3_ARCHS) == set(expected)
    for arch, (dim, depth, heads, ffn, hidden, millions) in expected.items():
        with torch.device("meta"):
            model = build_backbone(arch)
        assert (model.embed_dim, model.n_blocks, model.num_heads, model.patch_size) == (dim, depth, heads, 16)
        assert getattr(model.blocks[0].mlp, ffn).weight.shape == (hidden, dim), arch
        assert model.n_storage_tokens == 4 and model.blocks[0].ls1.gamma.shape == (dim,)
        assert model.norm.eps == 1e-5 and model.rope_embed.rescale_coords == 2.0
        assert model.rope_embed.periods.dtype == torch.float32
        n = sum(p.numel() for p in model.parameters())
        assert round(n / 1e6, 1) == millions, (arch, n)
    with torch.device("meta"):
        big = build_backbone("dinov3_vit7b16")
    assert big.blocks[0].attn.qkv.bias is None and "blocks.0.attn.qkv.bias_mask" not in big.state_dict()
    assert big.local_cls_norm is not None and big.cls_norm is None
    assert sum(p.numel() for p in big.parameters()) == 6_716_043_264


def test_factory_config_and_names():
    cfg = load_config("quickstart").model
    cfg.arch, cfg.depth, cfg.embed_dim, cfg.num_heads = "dinov3_vits16plus", 1, 64, 4
    model = build_backbone(cfg, drop_path_rate=0.1)
    # the release's FFN and storage tokens win over the DINOv2-oriented keys of the config
    assert isinstance(model, DinoV3VisionTransformer) and hasattr(model.blocks[0].mlp, "w1")
    assert model.n_storage_tokens == 4 and (model.embed_dim, model.n_blocks) == (64, 1)
    assert set(backbone_kwargs(cfg)) == {"img_size", "patch_size", "drop_path_uniform", "attn_backend",
                                         "embed_dim", "depth", "num_heads"}
    with pytest.raises(ValueError, match="dinov3_vits16"):
        build_backbone("dinov3_vitz16")


def test_training_forward_of_the_engine_backpropagates():
    # what methods.dinov2 does with a student: a list of global and local crops, masks for the globals, in training
    model = tiny(drop_path_rate=0.2, untie_global_and_local_cls_norm=True).train()
    g, l = torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[:, :2] = True
    out_g, out_l = model([g, l], masks=[masks, None], is_training=True)
    loss = out_g["x_norm_clstoken"].sum() + out_g["x_norm_patchtokens"][masks].sum() + out_l["x_norm_clstoken"].sum()
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0 and model.local_cls_norm.weight.grad.abs().sum() > 0
    assert model.storage_tokens.grad.abs().sum() > 0 and model.blocks[1].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.blocks[0].drop_path1.drop_prob == model.blocks[1].drop_path1.drop_prob == 0.2  # uniform, as DINOv3
