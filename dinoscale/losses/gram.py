"""Gram anchoring (DINOv3, Simeoni et al. 2025, Sec. 4): keep the student's patch-to-patch similarities close to
those of an earlier network (the Gram teacher), so that long training does not degrade the dense features.

With ``X`` the student's patch features of one image (``N x D``) and ``Y`` the Gram teacher's at the same
positions, each row L2-normalised (``normalize``)::

    G_s = X X^T,   G_t = Y Y^T                           (N x N cosine similarities)
    L   = 1 / (B N^2) * sum_b || G_s(b) - G_t(b) ||_F^2  (mean squared difference, over the B images)

``per_image=False`` takes the Gram matrix of all the ``B * N`` patches of the batch instead (one
``BN x BN`` matrix, ``L = ||G_s - G_t||_F^2 / (BN)^2``); the per-image loss is the one DINOv3's Gram stage uses and
the one that does not depend on how the batch is split over ranks. Two options drop negative similarities before
the difference: ``remove_neg`` clamps both matrices at 0; ``remove_only_teacher_neg`` clamps the teacher's and
zeroes the student's where both are negative. (DINOv3's code tests the teacher's similarity for that after
clamping it, so its student entries are never zeroed; here the teacher's sign is read before the clamp.)

The teacher side carries no gradient; everything runs in float32.

Example::

    >>> import torch
    >>> from dinoscale.losses.gram import gram_loss
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # one image, two patches: orthogonal
    >>> y = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])  # the teacher's: parallel
    >>> gram_loss(x, y)  # Gram matrices [[1, 0], [0, 1]] and all ones: two of four entries differ by 1
    tensor(0.5000)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GramLoss", "gram_loss"]


def _gram(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    features = features.float()
    if normalize:
        features = F.normalize(features, dim=-1)
    return features @ features.transpose(-1, -2)


def gram_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    normalize: bool = True,
    per_image: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
) -> torch.Tensor:
    """The Gram anchoring loss of the module docstring.

    Args:
        student: patch features ``(B, N, D)`` (or ``(M, D)`` selected patches, then ``per_image=False``).
        teacher: the Gram teacher's features at the same positions, same shape (no gradient flows into it).
        normalize: L2-normalise every feature first (cosine similarities).
        per_image: one ``N x N`` Gram matrix per image; ``False``: one over all patches of the batch.
        remove_neg, remove_only_teacher_neg: drop negative similarities (see the module docstring); at most one.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher features differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("choose at most one of remove_neg and remove_only_teacher_neg")
    if per_image and student.ndim != 3:
        raise ValueError(f"per-image Gram matrices need (B, N, D) features, got {tuple(student.shape)}")
    if not per_image:
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    with torch.autocast(student.device.type, enabled=False):  # fp32 products, also under training's autocast
        with torch.no_grad():
            target = _gram(teacher.detach(), normalize)
        sims = _gram(student, normalize)
        if remove_neg:
            target, sims = target.clamp(min=0), sims.clamp(min=0)
        elif remove_only_teacher_neg:
            both_negative = (target < 0) & (sims < 0)
            target, sims = target.clamp(min=0), sims.masked_fill(both_negative, 0.0)
        return F.mse_loss(sims, target)


class GramLoss(nn.Module):
    """:func:`gram_loss` with its options fixed (DINOv3's ``gram.normalized``, ``img_level``, ``remove_neg``,
    ``remove_only_teacher_neg``)."""

    def __init__(self, *, normalize: bool = True, per_image: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("choose at most one of remove_neg and remove_only_teacher_neg")
        self.normalize, self.per_image = normalize, per_image
        self.remove_neg, self.remove_only_teacher_neg = remove_neg, remove_only_teacher_neg

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return gram_loss(student, teacher, normalize=self.normalize, per_image=self.per_image,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg)

    def extra_repr(self) -> str:
        return (f"normalize={self.normalize}, per_image={self.per_image}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}")
