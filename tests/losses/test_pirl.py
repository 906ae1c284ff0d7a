import math

import pytest
import torch
import torch.nn.functional as F

from dinoscale.losses.pirl import PIRLLoss


def test_hand_computed_value():
    # D = 2, one image, two negatives, tau = 0.5, lambda = 0.5:
    #   l(m, g): <m,g> = 0, negatives 1 and 0      -> -log(e^0 / (e^0 + e^2 + e^0))   = log(2 + e^2)
    #   l(m, f): <m,f> = 1, negatives 0 and -1     -> -log(e^2 / (e^2 + e^0 + e^-2))  = log(1 + e^-2 + e^-4)
    m = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    f, g = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])  # not unit: the loss normalises them
    loss, terms = PIRLLoss(temperature=0.5, jigsaw_weight=0.5)(f, g, m, negatives)
    jig, img = math.log(2 + math.e**2), math.log(1 + math.e**-2 + math.e**-4)
    assert terms["nce_jigsaw"].item() == pytest.approx(jig, rel=1e-6)
    assert terms["nce_image"].item() == pytest.approx(img, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * jig + 0.5 * img, rel=1e-6)
    # lambda weighs the jigsaw term; an excluded negative (the image's own entry) leaves the sum.
    loss, _ = PIRLLoss(temperature=0.5, jigsaw_weight=0.25)(f, g, m, negatives)
    assert loss.item() == pytest.approx(0.25 * jig + 0.75 * img, rel=1e-6)
    _, terms = PIRLLoss(temperature=0.5)(f, g, m, negatives, exclude=torch.tensor([[True, False]]))
    assert terms["nce_jigsaw"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_gradient_reaches_the_embeddings_only_and_lowers_the_loss():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(50, 8), dim=1)
    f, g = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    pos, neg = bank[:4].clone().requires_grad_(True), bank[4:].clone().requires_grad_(True)
    loss_fn = PIRLLoss()
    loss, _ = loss_fn(f, g, pos, neg)
    loss.backward()
    assert f.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None  # the memory bank is a target, not trained
    with torch.no_grad():
        after, _ = loss_fn(f - 0.5 * f.grad, g - 0.5 * g.grad, pos, neg)
    assert after < loss


def test_bad_inputs_raise():
    loss = PIRLLoss()
    with pytest.raises(ValueError, match="one shape"):
        loss(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="negatives"):
        loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="lambda"):
        PIRLLoss(jigsaw_weight=1.5)
