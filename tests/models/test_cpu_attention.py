"""The CPU low-precision attention path (sdpa backend, bf16 on CPU): same function as the fused kernel."""

import pytest
import torch
import torch.nn.functional as F

import dinoscale.models.attention as attention_module
from dinoscale.models.attention import Attention, cpu_low_precision_attention


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("DINOSCALE_ATTN", raising=False)


def _qkv(B=3, H=4, N=37, d=16, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # large logits (scale 2 on q and k): rounding the scores to bf16 would show here
    return [torch.randn(B, H, N, d, generator=g) * s for s in (scale, scale, 1.0)]


def test_matches_float64_reference_as_closely_as_the_fused_kernel():
    q, k, v = _qkv()
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    lowp = [t.bfloat16() for t in (q, k, v)]
    ours = cpu_low_precision_attention(*lowp)
    fused = F.scaled_dot_product_attention(*lowp)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - reference).abs()
    err_fused = (fused.double() - reference).abs()
    # fp32 scores and softmax: as accurate as the fused kernel (only the output and p are rounded)
    assert err_ours.mean() <= 1.2 * err_fused.mean()
    assert err_ours.max() <= 1.2 * err_fused.max()


def test_gradients_match_the_fused_kernel():
    q, k, v = _qkv(N=20)
    grads = {}
    for name, fn in (("ours", cpu_low_precision_attention), ("fused", F.scaled_dot_product_attention)):
        leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[name] = [t.grad.float() for t in leaves]
    for ours, fused in zip(grads["ours"], grads["fused"]):
        torch.testing.assert_close(ours, fused, atol=0.05, rtol=0.05)


def test_dispatch_cpu_bf16_uses_the_matmul_path_and_large_calls_the_fused_kernel(monkeypatch):
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
    attn(x)
    assert calls == [1]  # fp32: the fused kernel
    torch.testing.assert_close(bf16_out.float(), attn(x), atol=0.03, rtol=0.03)
    # above the score budget the fused kernel takes over (its memory does not grow with N^2)
    monkeypatch.setattr(attention_module, "CPU_ATTN_MAX_SCORES", 2 * 4 * 9 * 9 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)
    assert calls == [1, 1, 1]
