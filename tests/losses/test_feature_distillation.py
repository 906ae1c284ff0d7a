import doctest
import math

import pytest
import torch

from dinoscale.losses import feature_distillation
from dinoscale.losses.feature_distillation import feature_distillation_loss, standardize_tokens


def naive(student, teacher, kind):
    """The docstring's formula, one token at a time in float64."""
    s = student.double().reshape(-1, student.shape[-1])
    t = teacher.double().reshape(-1, teacher.shape[-1])
    losses = []
    for p, tok in zip(s, t):
        mean = tok.mean()
        var = ((tok - mean) ** 2).mean()
        target = (tok - mean) / math.sqrt(var + 1e-6)
        if kind == "cosine":
            losses.append(1 - float(p @ target) / (float(p.norm()) * float(target.norm())))
        else:
            diff = (p - target).abs()
            losses.append(float(torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_matches_the_formula_on_cls_and_patch_shapes(kind):
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 8), (2, 5, 8)):  # [CLS] (B, D) and patch tokens (B, N, D)
        student, teacher = torch.randn(shape, generator=g), 3 + 2 * torch.randn(shape, generator=g)
        assert feature_distillation_loss(student, teacher, kind).item() == pytest.approx(
            naive(student, teacher, kind), rel=1e-5)


def test_the_teachers_scale_and_offset_do_not_matter():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for kind in ("cosine", "smooth_l1"):
        a = feature_distillation_loss(student, teacher, kind)
        b = feature_distillation_loss(student, 5.0 * teacher - 2.0, kind)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_the_gradient_reaches_the_student_only():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    feature_distillation_loss(student, teacher, "smooth_l1").backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_runs_in_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(4, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = feature_distillation_loss(student, teacher, "cosine")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(feature_distillation_loss(student.float(), teacher.float()).item(), rel=1e-6)
    assert standardize_tokens(teacher).dtype == torch.float32


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown feature loss 'l2'"):
        feature_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l2")
    with pytest.raises(ValueError, match="project the student to the teacher's width"):
        feature_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no tokens"):
        feature_distillation_loss(torch.zeros(0, 3), torch.zeros(0, 3))


def test_the_docstring_example_runs():
    result = doctest.testmod(feature_distillation)
    assert result.attempted >= 4 and result.failed == 0
