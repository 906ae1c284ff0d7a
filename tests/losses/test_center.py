"""The teacher targets shared by DINO and iBOT: centering (softmax, EMA update) and Sinkhorn-Knopp."""

import math

import pytest
import torch

from dinoscale.losses.center import (
    CenteredPrototypeLoss,
    global_mean,
    sinkhorn_knopp,
    softmax_center,
    update_center_,
)
from dinoscale.losses.dino import DINOLoss


class _Loss(CenteredPrototypeLoss):
    fused_center_update = False
    dim_name = "n_dim"


def test_softmax_center_by_hand_for_either_center_layout():
    temp = 0.5
    for center in (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[[1.0, 2.0, 3.0]]])):
        # (t - center) / temp = log([1, 2, 5]) -> softmax = [1, 2, 5] / 8
        t = center.reshape(1, 3) + temp * torch.log(torch.tensor([[1.0, 2.0, 5.0]]))
        probs = softmax_center(t.unsqueeze(0).expand(2, 4, 3), center, temp)
        assert probs.shape == (2, 4, 3) and probs.dtype == torch.float32  # the logits' shape, whatever the center's
        assert torch.allclose(probs, torch.tensor([1 / 8, 2 / 8, 5 / 8]).expand(2, 4, 3), atol=1e-6)


def test_global_mean_by_hand_and_without_rows():
    mean, count = global_mean(torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 3.0], [1.0, 2.0]]]), 2)
    assert torch.equal(mean, torch.tensor([1.0, 2.0])) and count.item() == 4
    mean, count = global_mean(torch.zeros(0, 2), 2)
    assert torch.equal(mean, torch.zeros(2)) and count.item() == 0


@pytest.mark.parametrize("fused", [True, False])
def test_update_center_by_hand(fused):
    center = torch.zeros(1, 1, 3)
    update_center_(center, torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 0.0, 3.0]]), 0.9, fused=fused)
    assert torch.allclose(center, torch.full((1, 1, 3), 0.1))  # 0.9 * 0 + 0.1 * mean [1, 1, 1]
    update_center_(center, torch.full((2, 3), 2.0), 0.9, fused=fused)
    assert torch.allclose(center, torch.full((1, 1, 3), 0.9 * 0.1 + 0.1 * 2.0))
    before = center.clone()
    update_center_(center, torch.zeros(0, 3), 0.9, fused=fused)  # no row: unchanged, no division by zero
    assert torch.equal(center, before)
    update_center_(center, torch.full((2, 3), 5.0), 1.0, fused=fused)  # momentum 1 freezes the center
    assert torch.equal(center, before)


def test_update_center_rounds_as_each_loss_always_did():
    # DINOLoss added (1 - m) * mean in one multiply-add, iBOTPatchLoss rounded both products (DINOv2's form):
    # each form is kept to the bit, so runs and checkpoints reproduce exactly.
    torch.manual_seed(0)
    center, logits, m = torch.randn(1, 1000), torch.randn(7, 1000) * 10, 0.9
    mean = logits.mean(dim=0, keepdim=True)
    fused, unfused = center.clone(), center.clone()
    update_center_(fused, logits, m, fused=True)
    update_center_(unfused, logits, m, fused=False)
    assert torch.equal(fused, center.clone().mul_(m).add_(mean, alpha=1.0 - m))
    assert torch.equal(unfused, center * m + mean * (1.0 - m))


def test_base_checks_arguments_and_holds_the_center_buffer():
    loss = _Loss(4, student_temp=0.1, center_momentum=0.9, center_shape=(1, 1, 4))
    assert set(loss.state_dict()) == {"center"} and loss.center.shape == (1, 1, 4)
    with pytest.raises(ValueError, match="positive n_dim"):
        _Loss(0, 0.1, 0.9, center_shape=(1, 0))
    with pytest.raises(ValueError, match="student_temp"):
        _Loss(4, 0.0, 0.9, center_shape=(1, 4))
    with pytest.raises(ValueError, match="center_momentum"):
        _Loss(4, 0.1, 1.5, center_shape=(1, 4))
    with pytest.raises(ValueError, match="n_dim=4"):
        loss.softmax_center_teacher(torch.zeros(2, 5), 0.1)
    with pytest.raises(ValueError, match="n_dim=4"):
        loss.update_center(torch.zeros(2, 5))


def test_base_methods_are_the_functions_on_its_center():
    torch.manual_seed(0)
    loss = _Loss(4, student_temp=0.1, center_momentum=0.8, center_shape=(1, 4))
    logits = torch.randn(6, 4)
    center = torch.zeros(1, 4)
    assert torch.equal(loss.softmax_center_teacher(logits, 0.3), softmax_center(logits, center, 0.3))
    loss.update_center(logits)
    update_center_(center, logits, 0.8, fused=False)
    assert torch.equal(loss.center, center)
    assert torch.equal(loss.sinkhorn_knopp_teacher(logits, 0.3), sinkhorn_knopp(logits, 0.3, 6))
    assert torch.allclose(loss.sinkhorn_knopp_teacher(logits, 0.3).sum(dim=1), torch.ones(6), atol=1e-6)
    assert math.isclose(loss.center.sum().item(), 0.2 * logits.mean(dim=0).sum().item(), abs_tol=1e-6)


def test_sinkhorn_one_iteration_by_hand():
    # exp(teacher) = [[1, 3], [1, 1]] (samples x prototypes), teacher_temp 0.5.
    teacher = 0.5 * torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
    out = sinkhorn_knopp(teacher, teacher_temp=0.5, n_local_samples=2, n_iterations=1)
    # Q = [[1,1],[3,1]]/6 -> rows to 1/K: [[1/4,1/4],[3/8,1/8]] -> columns to 1/B: [[1/5,1/3],[3/10,1/6]]
    # -> times B and transposed.
    expected = torch.tensor([[2 / 5, 3 / 5], [2 / 3, 1 / 3]])
    assert torch.allclose(out, expected, atol=1e-6)
    loss = DINOLoss(out_dim=2)
    assert torch.allclose(loss.sinkhorn_knopp_teacher(teacher, 0.5, n_iterations=1), expected, atol=1e-6)


def test_sinkhorn_invariants():
    torch.manual_seed(0)
    batch, k = 12, 5
    teacher = torch.randn(batch, k)
    loss = DINOLoss(out_dim=k)
    for n_iter in (1, 3):
        out = loss.sinkhorn_knopp_teacher(teacher, teacher_temp=0.3, n_iterations=n_iter)
        assert out.shape == (batch, k) and (out >= 0).all()
        # The last step normalises the samples: each row sums to 1 exactly.
        assert torch.allclose(out.sum(dim=1), torch.ones(batch), atol=1e-6)
    # The prototype marginals approach B / K as the alternation converges.
    target = torch.full((k,), batch / k)
    err = [
        (loss.sinkhorn_knopp_teacher(teacher, 0.3, n_iterations=n).sum(dim=0) - target).abs().max().item()
        for n in (1, 3, 50)
    ]
    assert err[2] < err[1] < err[0]
    assert err[2] < 1e-4


def test_sinkhorn_is_stable_at_low_temperature():
    # exp(40 / 0.04) overflows float32 without the max shift.
    teacher = torch.tensor([[40.0, 39.99, 39.98], [39.97, 40.0, 39.96], [39.95, 39.96, 40.0]])
    out = sinkhorn_knopp(teacher, teacher_temp=0.04, n_local_samples=3)
    assert torch.isfinite(out).all()
    ref = sinkhorn_knopp(teacher - 40.0, teacher_temp=0.04, n_local_samples=3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.1, 2, n_iterations=0)
    with pytest.raises(ValueError, match="samples, prototypes"):
        sinkhorn_knopp(torch.zeros(2, 2, 2), 0.1, 2)
