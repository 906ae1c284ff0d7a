import doctest
import math

import pytest
import torch

from dinoscale.losses import dvae
from dinoscale.losses.dvae import DVAELoss


def test_reconstruction_plus_weighted_kl_to_the_uniform_prior_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (B=1, C=1, 2, 2)
    x_hat = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]]]])  # errors 1, 0, -2, 0
    # two cells over K = 2 tokens: q = (0.5, 0.5) (KL 0) and q = softmax(log 3, 0) = (0.75, 0.25)
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    kl_second = 0.75 * math.log(0.75 * 2) + 0.25 * math.log(0.25 * 2)
    kl = (0.0 + kl_second) / 2
    loss, terms = DVAELoss("mse")(x_hat, x, logits, kl_weight=0.5)
    assert terms["reconstruction"].item() == pytest.approx((1 + 4) / 4)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(5 / 4 + 0.5 * kl, rel=1e-6)
    l1, terms = DVAELoss("l1")(x_hat, x, logits, kl_weight=0.0)
    assert l1.item() == pytest.approx((1 + 2) / 4) and terms["reconstruction"].item() == pytest.approx(0.75)


def test_kl_bounds_and_gradient():
    uniform = torch.zeros(2, 8, 3, 3, requires_grad=True)
    x = torch.zeros(2, 3, 6, 6)
    _, terms = DVAELoss()(x, x, uniform, kl_weight=1.0)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-7)
    certain = torch.full((2, 8, 3, 3), -1e4)
    certain[:, 3] = 0.0
    _, terms = DVAELoss()(x, x, certain, kl_weight=1.0)
    assert terms["kl"].item() == pytest.approx(math.log(8), rel=1e-6)
    # the KL pulls the logits towards uniform: a peaked cell's top logit gets a positive gradient (descent lowers it)
    peaked = torch.zeros(1, 4, 1, 1)
    peaked[0, 0] = 2.0
    peaked.requires_grad_(True)
    DVAELoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), peaked, kl_weight=1.0)[0].backward()
    assert peaked.grad[0, 0, 0, 0] > 0 and (peaked.grad[0, 1:] < 0).all()


def test_bad_inputs_are_named():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        DVAELoss()(torch.zeros(1, 3, 4, 5), x, torch.zeros(1, 8, 1, 1), kl_weight=0.1)
    with pytest.raises(ValueError, match="kl_weight"):
        DVAELoss()(x, x, torch.zeros(1, 8, 1, 1), kl_weight=-1.0)
    with pytest.raises(ValueError, match="reconstruction"):
        DVAELoss("huber")


def test_docstring_example():
    assert doctest.testmod(dvae).failed == 0
