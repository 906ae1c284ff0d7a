"""Speed paths of the backbone: CPU matmul attention (same function as the fused kernel), packed
multi-crop tokens (same function as crop-by-crop) and the CPU patch embedding as a matmul (same function as its
convolution)."""

import pytest
import torch
import torch.nn.functional as F

import dinoscale.models.attention as attention_module
from dinoscale.models.attention import Attention, cpu_matmul_attention
from dinoscale.models.vit import PatchEmbed


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("DINOSCALE_ATTN", raising=False)


def _qkv(B=3, H=4, N=37, d=16, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # large logits (scale 2 on q and k): rounding the scores to bf16 would show here
    return [torch.randn(B, H, N, d, generator=g) * s for s in (scale, scale, 1.0)]


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "bf16-autocast"])
def test_matches_float64_reference_as_closely_as_the_fused_kernel(autocast):
    q, k, v = _qkv()
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    lowp = [t.bfloat16() for t in (q, k, v)]
    # under autocast (how training runs) a plain bf16 matmul would round the scores to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = cpu_matmul_attention(*lowp)
        fused = F.scaled_dot_product_attention(*lowp)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - reference).abs()
    err_fused = (fused.double() - reference).abs()
    # fp32 scores and softmax: as accurate as the fused kernel (only the output and p are rounded)
    assert err_ours.mean() <= 1.2 * err_fused.mean()
    assert err_ours.max() <= 1.2 * err_fused.max()


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "bf16-autocast"])
def test_gradients_as_close_to_float64_as_the_fused_kernel(autocast):
    q, k, v = _qkv()
    weights = torch.linspace(-1, 1, q.shape[-1], dtype=torch.float64)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    (F.scaled_dot_product_attention(*leaves) * weights).sum().backward()
    reference = [t.grad for t in leaves]
    errors = {}
    for name, fn in (("ours", cpu_matmul_attention), ("fused", F.scaled_dot_product_attention)):
        lowp = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*lowp)
        (out.double() * weights).sum().backward()
        assert all(t.grad.dtype == torch.bfloat16 for t in lowp)
        errors[name] = [float((t.grad.double() - r).norm() / r.norm()) for t, r in zip(lowp, reference)]
    # the scores' gradient rounded to bf16 before its two matmuls (as FlashAttention-2 does): the q, k and v
    # gradients no further from float64 than the fused kernel's
    for ours, fused in zip(errors["ours"], errors["fused"]):
        assert ours <= 1.1 * fused, errors


def test_packed_gradient_comes_back_in_the_packed_layout():
    q, k, v = _qkv(B=2, H=3, N=11, d=8)
    packed = torch.stack((q, k, v)).view(3, 6, 11, 8).requires_grad_()
    out = attention_module.cpu_matmul_attention_packed(packed)
    assert out.shape == (6, 11, 8)
    out.square().sum().backward()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves).square().sum().backward()
    expected = torch.stack([t.grad for t in leaves]).view(3, 6, 11, 8)
    assert packed.grad.shape == packed.shape and packed.grad.is_contiguous()
    torch.testing.assert_close(packed.grad, expected, atol=1e-4, rtol=1e-4)


def test_gradients_match_the_fused_kernel():
    q, k, v = _qkv(N=20)
    grads = {}
    for name, fn in (("ours", cpu_matmul_attention), ("fused", F.scaled_dot_product_attention)):
        leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[name] = [t.grad.float() for t in leaves]
    for ours, fused in zip(grads["ours"], grads["fused"]):
        torch.testing.assert_close(ours, fused, atol=0.05, rtol=0.05)


def test_dispatch_cpu_uses_the_matmul_path_and_long_or_large_calls_the_fused_kernel(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_out = attn(x)
        attn([x, torch.randn(3, 5, 32)])
    assert calls == []  # bf16 on CPU: the matmul path, also for lists of crops
    fp32_out = attn(x)
    assert calls == []  # fp32, 9 keys: the matmul path too
    torch.testing.assert_close(bf16_out.float(), fp32_out, atol=0.03, rtol=0.03)
    long_x = torch.randn(1, attention_module.CPU_FP32_MATMUL_MAX_TOKENS + 1, 32)
    long_out = attn(long_x)
    assert calls == [1]  # fp32, more keys: the fused kernel
    monkeypatch.setattr(attention_module, "CPU_FP32_MATMUL_MAX_TOKENS", 10**6)
    torch.testing.assert_close(attn(long_x), long_out, atol=1e-5, rtol=1e-5)  # both paths: the same function
    assert calls == [1]
    # above the score budget the fused kernel takes over (its memory does not grow with N^2)
    monkeypatch.setattr(attention_module, "CPU_ATTN_MAX_SCORES", 2 * 4 * 9 * 9 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)
    attn(x)
    assert calls == [1, 1, 1]


# ---------------------------------------------------------------------------------- packed multi-crop tokens


def _tiny_vit(**kwargs):
    from dinoscale.models.factory import build_backbone

    return build_backbone("vit_small", **{"patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2,
                        "init_values": 1e-5, **kwargs})


def test_block_packed_list_and_single_agree():
    from dinoscale.models.vit import pack_crops, unpack_crops

    model = _tiny_vit().eval()
    block = model.blocks[0]
    xs = [torch.randn(2, 17, 32), torch.randn(3, 5, 32)]
    packed, shapes = pack_crops(xs)
    assert packed.shape == (2 * 17 + 3 * 5, 32) and shapes == ((2, 17), (3, 5))
    out_packed = unpack_crops(block(packed, shapes), shapes)
    out_list = block(xs)
    for x, p, lst in zip(xs, out_packed, out_list):
        single = block(x)  # a crop alone: no token sees another crop or image
        torch.testing.assert_close(p, single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lst, single, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not match the crop shapes"):
        block.attn(packed[:-1], shapes)


def test_packed_drop_path_drops_whole_images_with_the_per_crop_draws():
    from dinoscale.models.vit import DropPath, pack_crops, unpack_crops

    drop = DropPath(0.5).train()
    xs = [torch.ones(16, 3, 4), torch.ones(32, 2, 4)]
    packed, shapes = pack_crops(xs)
    torch.manual_seed(0)
    out = unpack_crops(drop(packed, shapes), shapes)
    torch.manual_seed(0)
    expected = [drop(x) for x in xs]  # crop by crop, in order: the same random draws
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
        per_image = o.flatten(1)
        assert torch.all((per_image == 0).all(1) | (per_image == 2).all(1))


def test_multicrop_training_forward_with_drop_path_matches_crop_by_crop_blocks():
    """The packed ViT forward equals running each block crop by crop with the same random draws."""
    model = _tiny_vit(drop_path_rate=0.5).train()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    torch.manual_seed(3)
    outs = model.forward_features(crops)
    torch.manual_seed(3)
    xs = [model.prepare_tokens_with_masks(x) for x in crops]
    for blk in model.blocks:
        attn = [blk.attn(blk.norm1(x)) for x in xs]
        xs = [x + blk.drop_path1(blk.ls1(a)) for x, a in zip(xs, attn)]
        ffn = [blk._ffn(x) for x in xs]
        xs = [x + blk.drop_path2(f) for x, f in zip(xs, ffn)]
    for o, x in zip(outs, xs):
        torch.testing.assert_close(o["x_prenorm"], x, atol=1e-5, rtol=1e-5)


def test_compiled_blocks_with_different_drop_rates_share_one_graph():
    """Stochastic depth rates differ per block; compiling must not specialise on them (one graph per block
    would exceed dynamo's recompile limit at depth 12 and fall back to eager)."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _tiny_vit(depth=4, drop_path_rate=0.3).train()  # rates 0, 0.1, 0.2, 0.3
    for block in model.blocks:
        block.compile(backend=counting_backend)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    for _ in range(2):
        outs = model.forward_features(crops)
        sum(o["x_norm_clstoken"].sum() for o in outs).backward()
    # block 0 (rate 0: no drop path at all) and one graph for the three others
    assert len(graphs) == 2, len(graphs)
    torch._dynamo.reset()


def _conv_patch_embed(module, x):
    return module.proj(x).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("in_chans,patch,size", [(3, 7, (28, 21)), (4, 14, (42, 56)), (1, 16, (32, 32))])
def test_cpu_patch_embed_is_its_convolution(in_chans, patch, size):
    torch.manual_seed(0)
    module = PatchEmbed(img_size=size[0], patch_size=patch, in_chans=in_chans, embed_dim=24)
    x = torch.randn(3, in_chans, *size, requires_grad=True)
    grad = torch.randn(3, (size[0] // patch) * (size[1] // patch), 24)
    results = []
    for fn in (lambda m, t: m(t), _conv_patch_embed):  # the module's CPU path, then the convolution itself
        out = fn(module, x)
        out.backward(grad)
        results.append([out.detach(), module.proj.weight.grad, module.proj.bias.grad, x.grad])
        module.zero_grad(set_to_none=True)
        x.grad = None
    for ours, conv in zip(*results):
        torch.testing.assert_close(ours, conv, rtol=1e-5, atol=1e-5)
    # under bf16 autocast both run in bf16 (output dtype and values at bf16 resolution) and hand back float32
    # gradients to the float32 weight
    grads = []
    for fn in (lambda m, t: m(t), _conv_patch_embed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(module, x.detach())
        out.float().backward(grad)
        grads.append((out.detach(), module.proj.weight.grad))
        module.zero_grad(set_to_none=True)
    (ours, ours_grad), (conv, conv_grad) = grads
    assert ours.dtype == conv.dtype == torch.bfloat16 and ours_grad.dtype == conv_grad.dtype == torch.float32
    torch.testing.assert_close(ours.float(), conv.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours_grad, conv_grad, rtol=2e-2, atol=5e-2)


def test_cpu_patch_embed_keeps_the_images_not_a_patch_copy():
    # what autograd saves for the backward: the images themselves (as the convolution does), no new tensor
    module = PatchEmbed(img_size=28, patch_size=7, embed_dim=8)
    x = torch.randn(2, 3, 28, 28)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    assert any(t is x for t in saved)
    assert all(t is x or t is module.proj.weight for t in saved), [tuple(t.shape) for t in saved]


def test_traced_patch_embed_keeps_the_convolution():
    module = PatchEmbed(img_size=28, patch_size=7, embed_dim=8)
    x = torch.randn(2, 3, 28, 28)
    traced = torch.jit.trace(module, (x,))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::linear" not in kinds, kinds
    torch.testing.assert_close(traced(x), module(x), rtol=1e-5, atol=1e-5)
