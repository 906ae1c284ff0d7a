import math

import pytest
import torch

from dinoscale.losses.dino import DINOLoss, dino_cls_loss


def _logits_for(probs, student_temp=0.1, shift=0.0):
    """Student logits whose log_softmax(s / student_temp) is log(probs) (plus a per-row shift)."""
    return student_temp * (torch.log(torch.tensor(probs, dtype=torch.float64)) + shift).float()


def test_center_update_formula():
    loss = DINOLoss(out_dim=3, center_momentum=0.9)
    assert torch.equal(loss.center, torch.zeros(1, 3))
    loss.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))  # mean [2, 2, 2]
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.2, 0.2]]))
    loss.update_center(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))  # mean [0, 0, 1]
    assert torch.allclose(loss.center, torch.tensor([[0.18, 0.18, 0.28]]))


def test_center_is_a_buffer_in_state_dict():
    loss = DINOLoss(out_dim=4)
    loss.update_center(torch.ones(2, 4))
    state = loss.state_dict()
    assert set(state) == {"center"} and torch.allclose(state["center"], torch.full((1, 4), 0.1))
    fresh = DINOLoss(out_dim=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.center, loss.center)


def test_softmax_center_teacher_values():
    loss = DINOLoss(out_dim=3)
    loss.center.copy_(torch.tensor([[0.18, 0.18, 0.28]]))
    teacher_temp = 0.5
    # (t - center) / temp = log([1, 2, 5]) -> softmax = [1, 2, 5] / 8
    t = loss.center + teacher_temp * torch.log(torch.tensor([[1.0, 2.0, 5.0]]))
    probs = loss.softmax_center_teacher(t, teacher_temp)
    assert torch.allclose(probs, torch.tensor([[1 / 8, 2 / 8, 5 / 8]]), atol=1e-6)
    # Without subtracting the center the answer would differ.
    assert not torch.allclose(torch.softmax(t / teacher_temp, -1), probs, atol=1e-3)


def test_dino_loss_2x3_by_hand():
    loss = DINOLoss(out_dim=3, student_temp=0.1)
    # Row 0 student distribution [1/2, 1/4, 1/4], row 1 uniform; arbitrary per-row shifts.
    student = torch.cat(
        [_logits_for([[0.5, 0.25, 0.25]], shift=3.0), _logits_for([[1 / 3, 1 / 3, 1 / 3]], shift=-1.0)]
    )
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    # CE row 0 = -log(1/2); CE row 1 = -(0.5 log(1/3) + 0.5 log(1/3)) = log 3; mean over rows.
    expected = (math.log(2) + math.log(3)) / 2
    assert loss([student], [teacher]).item() == pytest.approx(expected, abs=1e-5)
    # Two students x two teachers: the four pair terms are summed.
    expected_pairs = 2 * expected + 2 * (math.log(4) / 2 + math.log(3) / 2)
    got = loss([student, student], [teacher, teacher.flip(0)])
    # With teacher rows swapped: row 0 target [0, .5, .5] -> -0.5(log 1/4 + log 1/4) = log 4; row 1 -> log 3.
    assert got.item() == pytest.approx(expected_pairs, abs=1e-5)


def test_dino_loss_rejects_mismatched_shapes():
    loss = DINOLoss(out_dim=3)
    with pytest.raises(ValueError, match="shape"):
        loss([torch.zeros(2, 3)], [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="out_dim=3"):
        loss([torch.zeros(2, 4)], [torch.zeros(2, 4)])


def test_dino_cls_loss_weighting_by_hand():
    loss = DINOLoss(out_dim=2, student_temp=0.1)
    # B = 1, two global crops A, B and one local crop.
    t_a, t_b = [1.0, 0.0], [0.0, 1.0]
    teacher = torch.tensor([t_a, t_b])
    s_a, s_b, s_l = [0.5, 0.5], [0.25, 0.75], [1 / 3, 2 / 3]
    student_global = _logits_for([s_a, s_b])
    student_local = _logits_for([s_l])
    global_term, local_term = dino_cls_loss(loss, student_global, student_local, teacher)
    # n_global_terms = 2, n_local_terms = 1 * 2 = 2 -> norm 4.
    # global = 2 * mean(CE(s_A, t_B), CE(s_B, t_A)) / 4 = (-log 1/2 - log 1/4) / 4
    assert global_term.item() == pytest.approx((math.log(2) + math.log(4)) / 4, abs=1e-5)
    # local = (CE(s_L, t_A) + CE(s_L, t_B)) / 4 = (-log 1/3 - log 2/3) / 4
    assert local_term.item() == pytest.approx((math.log(3) + math.log(1.5)) / 4, abs=1e-5)
    # Each view supervising itself would give (-log 1/2 - log 3/4) / 4 instead.
    assert global_term.item() != pytest.approx((math.log(2) + math.log(4 / 3)) / 4, abs=1e-3)


def test_dino_cls_loss_two_local_crops_batch_two():
    torch.manual_seed(1)
    loss = DINOLoss(out_dim=4, student_temp=0.1)
    batch, n_local = 2, 2
    sg = torch.randn(2 * batch, 4)
    sl = torch.randn(n_local * batch, 4)
    tp = torch.softmax(torch.randn(2 * batch, 4), -1)

    def ce(s, t):  # batch-mean cross-entropy, written out
        return -(t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()

    s_a, s_b, t_a, t_b = sg[:batch], sg[batch:], tp[:batch], tp[batch:]
    norm = 2 + n_local * 2
    exp_global = (ce(s_a, t_b) + ce(s_b, t_a)) / norm
    exp_local = sum(ce(sl[i * batch : (i + 1) * batch], t) for i in range(n_local) for t in (t_a, t_b)) / norm
    g, l = dino_cls_loss(loss, sg, sl, tp)
    assert g.item() == pytest.approx(exp_global.item(), abs=1e-5)
    assert l.item() == pytest.approx(exp_local.item(), abs=1e-5)


def test_dino_cls_loss_without_local_crops_uses_dinov2_clamp():
    loss = DINOLoss(out_dim=2, student_temp=0.1)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student_global = _logits_for([[0.5, 0.5], [0.25, 0.75]])
    g, l = dino_cls_loss(loss, student_global, None, teacher)
    # norm = n_global_terms + max(0, 1) = 3
    assert g.item() == pytest.approx(2 * (math.log(2) + math.log(4)) / 2 / 3, abs=1e-5)
    assert l.item() == 0.0


def test_dino_cls_loss_rejects_bad_shapes():
    loss = DINOLoss(out_dim=2)
    with pytest.raises(ValueError, match="same shape"):
        dino_cls_loss(loss, torch.zeros(4, 2), None, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2 global crops"):
        dino_cls_loss(loss, torch.zeros(3, 2), None, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        dino_cls_loss(loss, torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(4, 2))
