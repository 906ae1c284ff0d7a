import pytest
import torch
import torch.nn as nn

from dinoscale.models.heads import DINOHead, WeightNormLinear, is_last_layer_param


def _small_head(**kwargs):
    args = dict(in_dim=32, out_dim=48, hidden_dim=24, bottleneck_dim=16)
    args.update(kwargs)
    return DINOHead(**args)


def test_state_dict_keys_and_shapes_match_dinov2_layout():
    head = _small_head()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (24, 32),
        "mlp.0.bias": (24,),
        "mlp.2.weight": (24, 24),
        "mlp.2.bias": (24,),
        "mlp.4.weight": (16, 24),
        "mlp.4.bias": (16,),
        "last_layer.weight_g": (48, 1),
        "last_layer.weight_v": (48, 16),
    }
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU)


def test_output_shape_and_leading_dims():
    head = _small_head()
    assert head(torch.randn(5, 32)).shape == (5, 48)
    assert head(torch.randn(2, 3, 32)).shape == (2, 3, 48)


def test_init_weight_g_ones_mlp_trunc_normal_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=32, hidden_dim=256, bottleneck_dim=64)
    assert torch.equal(head.last_layer.weight_g, torch.ones(32, 1))
    for i in (0, 2, 4):
        layer = head.mlp[i]
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        # trunc_normal(std=0.02) truncates at +-2 (absolute), so nothing is far out; std is ~0.02.
        assert abs(layer.weight.std().item() - 0.02) < 0.003
    # Unit-norm prototypes at init: every output is a cosine similarity in [-1, 1].
    out = head(torch.randn(10, 64))
    assert out.abs().max() <= 1.0 + 1e-5
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-6)


def test_weight_norm_matches_torch_parametrization():
    torch.manual_seed(0)
    ours = WeightNormLinear(6, 4)
    with torch.no_grad():
        ours.weight_g.copy_(torch.tensor([[0.5], [2.0], [1.0], [3.0]]))
    ref = torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 4, bias=False), dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(3, 6)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    # Hand formula: row k of W is g_k * v_k / ||v_k||.
    v, g = ours.weight_v.detach(), ours.weight_g.detach()
    assert torch.allclose(ours(x), x @ (g * v / v.norm(dim=1, keepdim=True)).t(), atol=1e-6)


def test_weight_norm_is_plain_module_without_hooks_and_gets_gradients():
    head = _small_head()
    ll = head.last_layer
    assert not ll._forward_pre_hooks and not hasattr(ll, "parametrizations")
    assert {n for n, _ in ll.named_parameters()} == {"weight_g", "weight_v"}
    head(torch.randn(4, 32)).square().sum().backward()
    assert ll.weight_g.grad is not None and ll.weight_g.grad.abs().sum() > 0
    assert ll.weight_v.grad is not None and ll.weight_v.grad.abs().sum() > 0


def test_bottleneck_is_l2_normalised_before_prototypes():
    head = _small_head()
    x = torch.randn(4, 32)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    expected = z @ head.last_layer.weight.t()
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_last_layer_param_names():
    head = _small_head()
    frozen = [n for n, _ in head.named_parameters() if is_last_layer_param(n)]
    assert frozen == ["last_layer.weight_g", "last_layer.weight_v"]
    assert is_last_layer_param("dino_head.last_layer.weight_v")
    assert not is_last_layer_param("dino_head.mlp.4.weight")


def test_no_weight_decay_on_biases_and_prototype_magnitudes():
    assert _small_head().no_weight_decay() == {"mlp.0.bias", "mlp.2.bias", "mlp.4.bias", "last_layer.weight_g"}
    # DINOv2's rule: the MLP's batch-norm scales are decayed, their shifts are not
    assert _small_head(nlayers=2, use_bn=True).no_weight_decay() == {
        "mlp.0.bias", "mlp.1.bias", "mlp.3.bias", "last_layer.weight_g"
    }
    assert _small_head(nlayers=1).no_weight_decay() == {"mlp.bias", "last_layer.weight_g"}


def test_variants_one_layer_and_batchnorm():
    one = _small_head(nlayers=1)
    assert isinstance(one.mlp, nn.Linear) and one.mlp.weight.shape == (16, 32)
    assert one(torch.randn(3, 32)).shape == (3, 48)
    bn = _small_head(use_bn=True, mlp_bias=False)
    assert isinstance(bn.mlp[1], nn.BatchNorm1d) and bn.mlp[0].bias is None
    assert bn(torch.randn(3, 32)).shape == (3, 48)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="nlayers"):
        _small_head(nlayers=0)
    with pytest.raises(ValueError, match="out_dim"):
        _small_head(out_dim=0)
