import doctest
import math

import pytest
import torch

from dinoscale.losses import beit
from dinoscale.losses.beit import BEiTLoss


def test_cross_entropy_of_the_masked_patches_by_hand():
    # Three masked patches, K = 3 visual tokens.
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 0.0, -5.0]], requires_grad=True)
    targets = torch.tensor([2, 1, 0])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0), math.log(math.exp(5) + 1 + math.exp(-5))]
    expected = ((lse[0] - 3.0) + (lse[1] - 0.0) + (lse[2] - 5.0)) / 3
    loss, terms = BEiTLoss()(logits, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms["ce_masked"].item() == pytest.approx(expected, rel=1e-6) and not terms["ce_masked"].requires_grad
    # row 0 and row 2 have their target as argmax; row 1 is a three-way tie, whose argmax (token 0) is wrong
    assert terms["token_acc"].item() == pytest.approx(2 / 3)
    loss.backward()
    # d/dz of the mean cross-entropy: (softmax(z) - onehot(t)) / M
    torch.testing.assert_close(logits.grad[1], torch.tensor([1 / 3, -2 / 3, 1 / 3]) / 3)


def test_n_total_makes_ranks_average_to_the_global_mean():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 5), torch.randint(0, 5, (7,))
    whole, _ = BEiTLoss()(logits, targets)
    # Two ranks with 3 and 4 of the 7 masked patches, each dividing by 7 / 2: their mean is the global mean.
    a, _ = BEiTLoss()(logits[:3], targets[:3], n_total=torch.tensor(7 / 2))
    b, _ = BEiTLoss()(logits[3:], targets[3:], n_total=7 / 2)
    assert ((a + b) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    # per-rank means would not be (3 and 4 patches weigh alike)
    assert ((BEiTLoss()(logits[:3], targets[:3])[0] + BEiTLoss()(logits[3:], targets[3:])[0]) / 2).item() != \
        pytest.approx(whole.item(), rel=1e-6)


def test_empty_and_bad_inputs():
    loss, terms = BEiTLoss()(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and terms["token_acc"].item() == 0.0
    with pytest.raises(ValueError, match="long token ids"):
        BEiTLoss()(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        BEiTLoss()(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_docstring_example():
    assert doctest.testmod(beit).failed == 0
