import math

import pytest
import torch

from dinoscale.losses.dino import DINOLoss
from dinoscale.losses.ibot import iBOTPatchLoss


def _logits_for(probs, student_temp=0.1):
    return (student_temp * torch.log(torch.tensor(probs, dtype=torch.float64))).float()


def _case():
    """2 images x 3 patches; image 0 has patches 0 and 2 masked, image 1 has patch 1 masked."""
    masks = torch.tensor([[True, False, True], [False, True, False]])
    # Masked patches in row-major order: (0, 0), (0, 2), (1, 1).
    student = _logits_for([[0.5, 0.5], [0.25, 0.75], [1 / 3, 2 / 3]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # Cross-entropies: -log 1/2, -log 1/4, -log 1/3.
    ces = [math.log(2), math.log(4), math.log(3)]
    return student, teacher, masks, ces


def test_forward_masked_default_weights_by_hand():
    loss = iBOTPatchLoss(2, student_temp=0.1)
    student, teacher, masks, ces = _case()
    # Weights 1/2, 1/2 (image 0 has 2 masked patches) and 1 (image 1); divided by 2 images.
    expected = (ces[0] / 2 + ces[1] / 2 + ces[2]) / 2
    assert loss.forward_masked(student, teacher, masks).item() == pytest.approx(expected, abs=1e-5)


def test_forward_masked_explicit_weights_and_padding():
    loss = iBOTPatchLoss(2, student_temp=0.1)
    student, teacher, masks, ces = _case()
    weights = torch.tensor([0.2, 0.3, 0.5])
    expected = (0.2 * ces[0] + 0.3 * ces[1] + 0.5 * ces[2]) / 2
    assert loss.forward_masked(student, teacher, masks, masks_weight=weights).item() == pytest.approx(
        expected, abs=1e-5
    )
    # Padded buffers (upper bound on masked patches): extra rows are dropped by n_masked_patches.
    pad_s = torch.cat([student, torch.randn(2, 2)])
    pad_t = torch.cat([teacher, torch.tensor([[0.0, 1.0], [0.5, 0.5]])])
    default = (ces[0] / 2 + ces[1] / 2 + ces[2]) / 2
    got = loss.forward_masked(pad_s, pad_t, masks, n_masked_patches=torch.tensor([3]))
    assert got.item() == pytest.approx(default, abs=1e-5)


def test_forward_masked_image_without_masked_patches_counts_in_denominator():
    loss = iBOTPatchLoss(2, student_temp=0.1)
    student, teacher, masks, ces = _case()
    masks3 = torch.cat([masks, torch.zeros(1, 3, dtype=torch.bool)])
    expected = (ces[0] / 2 + ces[1] / 2 + ces[2]) / 3
    assert loss.forward_masked(student, teacher, masks3).item() == pytest.approx(expected, abs=1e-5)


def test_forward_masked_rejects_bad_input():
    loss = iBOTPatchLoss(2)
    student, teacher, masks, _ = _case()
    with pytest.raises(ValueError, match="bool"):
        loss.forward_masked(student, teacher, masks.long())
    with pytest.raises(ValueError, match="masks_weight"):
        loss.forward_masked(student, teacher, masks, masks_weight=torch.ones(2))
    with pytest.raises(ValueError, match="exceeds"):
        loss.forward_masked(student, teacher, masks, n_masked_patches=4)


def test_center_update_over_masked_patches():
    loss = iBOTPatchLoss(3, center_momentum=0.9)
    assert loss.center.shape == (1, 1, 3) and "center" in loss.state_dict()
    tokens = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 0.0, 3.0]])  # mean [1, 1, 1]
    loss.update_center(tokens)
    assert torch.allclose(loss.center, torch.full((1, 1, 3), 0.1))
    # A leading (1, M, K) dimension (DINOv2's layout) gives the same mean.
    loss.update_center(tokens.unsqueeze(0) * 2)  # mean [2, 2, 2]
    assert torch.allclose(loss.center, torch.full((1, 1, 3), 0.9 * 0.1 + 0.1 * 2))
    # No masked patch: the center is left unchanged (no division by zero).
    before = loss.center.clone()
    loss.update_center(torch.zeros(0, 3))
    assert torch.equal(loss.center, before)


def test_softmax_center_teacher_keeps_shape():
    loss = iBOTPatchLoss(3)
    loss.center.copy_(torch.tensor([[[1.0, 2.0, 3.0]]]))
    t = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0 + 0.1 * math.log(3), 3.0]])
    probs = loss.softmax_center_teacher(t, teacher_temp=0.1)
    assert probs.shape == (2, 3)
    assert torch.allclose(probs, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.6, 0.2]]), atol=1e-5)


def test_sinkhorn_matches_dino_and_checks_count():
    torch.manual_seed(0)
    t = torch.randn(7, 4)
    ibot = iBOTPatchLoss(4)
    out = ibot.sinkhorn_knopp_teacher(t, 0.2, n_masked_patches_tensor=torch.tensor([7]))
    assert torch.allclose(out, DINOLoss(4).sinkhorn_knopp_teacher(t, 0.2), atol=1e-7)
    assert torch.allclose(out.sum(1), torch.ones(7), atol=1e-6)
    count = torch.tensor([7])
    ibot.sinkhorn_knopp_teacher(t, 0.2, count)
    assert count.item() == 7  # the caller's tensor is not modified
    with pytest.raises(ValueError, match="number of rows"):
        ibot.sinkhorn_knopp_teacher(t, 0.2, n_masked_patches_tensor=6)
