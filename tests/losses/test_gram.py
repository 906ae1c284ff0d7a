"""Gram anchoring loss: hand-computed values, the per-image and batch forms, the negative-similarity options."""

import doctest
import math

import pytest
import torch

from dinoscale.losses import gram
from dinoscale.losses.gram import GramLoss, gram_loss


def test_docstring_example_runs():
    assert doctest.testmod(gram).failed == 0


def test_hand_computed_value():
    # image 1: student patches at 0 and 90 degrees, teacher's at 0 and 60 degrees (cos 0 vs cos 60 = 0.5)
    # image 2: both identical -> 0. Per image: 2 off-diagonal entries differ by 0.5, of 4 -> 2 * 0.25 / 4
    s = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [1.0, -1.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]], [[1.0, 1.0], [1.0, -1.0]]])
    assert gram_loss(s, t).item() == pytest.approx((2 * 0.25 / 4 + 0.0) / 2)
    # without normalisation the raw dot products count: image 1 [[4, 0], [0, 9]] vs [[1, .5], [.5, 1]]
    image1 = ((4 - 1) ** 2 + 2 * 0.5 ** 2 + (9 - 1) ** 2) / 4
    image2 = 0.0  # identical features
    assert gram_loss(s, t, normalize=False).item() == pytest.approx((image1 + image2) / 2)


def explicit(student, teacher, per_image):
    """Entry by entry, with cosine similarities (an independent computation of the same definition)."""
    cos = torch.nn.functional.cosine_similarity
    groups = list(zip(student, teacher)) if per_image else [(student.flatten(0, 1), teacher.flatten(0, 1))]
    total, count = 0.0, 0
    for x, y in groups:
        for i in range(len(x)):
            for j in range(len(x)):
                total += (cos(x[i], x[j], dim=0) - cos(y[i], y[j], dim=0)).item() ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("per_image", [True, False])
def test_matches_an_entrywise_computation(per_image):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    assert gram_loss(s, t, per_image=per_image).item() == pytest.approx(explicit(s, t, per_image), rel=1e-5)


def test_gradient_reaches_the_student_only_and_vanishes_at_the_target():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    gram_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    # a scaled copy of the teacher has the same cosine Gram matrix: zero loss
    assert gram_loss(3.0 * t.detach(), t).item() == pytest.approx(0.0, abs=1e-7)


def test_negative_similarities():
    # one image, two patches; student cos = -1, teacher cos = -0.5 (both negative)
    s = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    t = torch.tensor([[[1.0, 0.0], [-0.5, math.sqrt(3) / 2]]])
    assert gram_loss(s, t).item() == pytest.approx(2 * 0.5 ** 2 / 4)
    assert gram_loss(s, t, remove_neg=True).item() == pytest.approx(0.0)  # both clamped to 0
    assert gram_loss(s, t, remove_only_teacher_neg=True).item() == pytest.approx(0.0)  # both negative: dropped
    # teacher negative, student positive: the teacher's clamp to 0 leaves the student's value as the difference
    s2 = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]]])  # cos = 0.5
    assert gram_loss(s2, t, remove_only_teacher_neg=True).item() == pytest.approx(2 * 0.5 ** 2 / 4)
    with pytest.raises(ValueError, match="at most one"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)


def test_selected_patches_take_the_batch_form():
    s, t = torch.randn(7, 8), torch.randn(7, 8)
    assert GramLoss(per_image=False)(s, t).item() == pytest.approx(explicit(s[None], t[None], True), rel=1e-5)
    with pytest.raises(ValueError, match="per-image"):
        GramLoss()(s, t)
