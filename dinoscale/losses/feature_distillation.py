"""Head-free feature distillation: the student's projected tokens regress a frozen teacher's normalised tokens.

A teacher without DINO/iBOT heads (every released backbone) still gives features; the student learns to
predict them through a small projector ``p`` (the student's width to the teacher's). For student tokens ``s``
and the teacher's tokens ``t`` of the same view (each ``(..., D)``; CLS tokens or patch tokens)::

    t_hat = (t - mean(t)) / sqrt(var(t) + 1e-6)          per token, over its D channels (LayerNorm, no affine)
    cosine:     loss = mean over tokens of  1 - <p(s), t_hat> / (|p(s)| |t_hat|)
    smooth_l1:  loss = mean over tokens and channels of  huber(p(s) - t_hat),
                huber(x) = x^2 / 2 if |x| < 1 else |x| - 1/2      (torch's smooth L1 with beta = 1)

Standardising the teacher's tokens makes the targets of every teacher the same scale (their final norms'
affine weights differ), so the smooth-L1 loss means the same for a timm, Hugging Face or DINOv2 teacher;
cosine ignores the scale anyway. Computed in float32 with autocast disabled.

Example::

    >>> import torch
    >>> from dinoscale.losses.feature_distillation import feature_distillation_loss, standardize_tokens
    >>> teacher = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    >>> round(float(feature_distillation_loss(standardize_tokens(teacher), teacher, "cosine")), 6)
    0.0
    >>> round(float(feature_distillation_loss(-standardize_tokens(teacher), teacher, "cosine")), 6)
    2.0
    >>> standardize_tokens(teacher)  # the target: mean 2.5 and variance 1.25 taken out
    tensor([[-1.3416, -0.4472,  0.4472,  1.3416]])
    >>> round(float(feature_distillation_loss(torch.zeros(1, 4), teacher, "smooth_l1")), 4)  # mean huber(t_hat)
    0.4708
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FEATURE_LOSSES", "feature_distillation_loss", "standardize_tokens"]

FEATURE_LOSSES = ("cosine", "smooth_l1")


def standardize_tokens(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token (last dimension) to zero mean and unit variance, in float32: the targets of the loss."""
    return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=eps)


def feature_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """The mean loss between projected student tokens and the teacher's tokens, see the module docstring.

    Args:
        student: ``(..., D)`` student tokens after the projector (with gradient).
        teacher: ``(..., D)`` the teacher's tokens of the same views, as the teacher outputs them (standardised
            here); no gradient flows into them.
        kind: ``"cosine"`` or ``"smooth_l1"``.
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss '{kind}'; choose one of {FEATURE_LOSSES}")
    if student.shape != teacher.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} must have "
                         "the same shape (project the student to the teacher's width first)")
    if student.numel() == 0:
        raise ValueError("feature_distillation_loss got no tokens")
    with torch.autocast(device_type=student.device.type, enabled=False):
        target = standardize_tokens(teacher.detach())
        prediction = student.float()
        if kind == "cosine":
            return (1.0 - F.cosine_similarity(prediction, target, dim=-1, eps=1e-8)).mean()
        return F.smooth_l1_loss(prediction, target, beta=1.0)
