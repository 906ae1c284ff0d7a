"""benchmarks/layerscale_fold.py: its B variant (LayerScale on the branch outputs) computes the same function and
gradients as the model's folded LayerScale, on a tiny ViT with random gammas, single tensors and lists of crops,
and it really is the other code path (the folded weight product is not computed)."""

import sys

import pytest
import torch

from dinoscale.models import attention
from dinoscale.models.vit import DinoVisionTransformer


@pytest.fixture(scope="module")
def lf(load_benchmark):
    return load_benchmark("layerscale_fold")


def _tiny():
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, init_values=1e-5)
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.normal_()
            block.ls2.gamma.normal_()
    return model


def test_output_scaled_copy_computes_the_same_function_and_gradients(lf):
    folded = _tiny()
    output = lf.output_scaled_copy(folded)
    assert all(type(b) is lf.OutputScaledBlock for b in output.blocks)
    assert all(type(b) is not lf.OutputScaledBlock for b in folded.blocks)  # the original is left alone
    crops = [torch.randn(2, 3, 28, 28), torch.randn(3, 3, 14, 14)]
    assert lf.max_abs_diff(folded, output, crops) < 1e-5
    direction = torch.randn(32)  # a fixed random readout: the gradients are not the near-zero ones of a norm
    for model in (folded, output):
        outs = model.forward_features(crops)
        sum((o["x_norm_patchtokens"] @ direction).sum() + o["x_norm_clstoken"].sum() for o in outs).backward()
    for (name, a), (_, b) in zip(folded.named_parameters(), output.named_parameters()):
        if a.grad is None:  # the mask token, unused without masks
            assert b.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * a.grad.abs().max().item(), msg=name)
    single = torch.randn(2, 3, 28, 28)
    assert (folded(single) - output(single)).abs().max() < 1e-5


def test_output_scaled_blocks_do_not_fold(lf, monkeypatch):
    calls = []
    real = attention.scaled_linear

    def counting(linear, x, scale):
        calls.append(scale is not None)
        return real(linear, x, scale)

    # proj goes through attention.scaled_linear, fc2 through vit's import of it
    monkeypatch.setattr(attention, "scaled_linear", counting)
    monkeypatch.setattr(sys.modules["dinoscale.models.vit"], "scaled_linear", counting)
    folded = _tiny()
    output = lf.output_scaled_copy(folded)
    x = torch.randn(1, 3, 28, 28)
    output(x)
    assert calls and not any(calls)  # every branch's last linear ran unscaled
    calls.clear()
    folded(x)
    assert calls and all(calls)
