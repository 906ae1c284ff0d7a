"""DINO self-distillation loss on the [CLS] token (Caron et al. 2021, Oquab et al. 2023).

The teacher's prototype scores are turned into targets either by centering + sharpening
(``softmax_center_teacher``) or by Sinkhorn-Knopp (``sinkhorn_knopp_teacher``), both from
``dinoscale.losses.center``; the student is trained with the cross-entropy against these targets.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dinoscale.losses.center import CenteredPrototypeLoss

__all__ = ["DINOLoss", "dino_cls_loss", "soft_cross_entropy"]


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_k t_k * log_softmax(s / student_temp)_k`` (computed in float32)."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student and teacher outputs must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -torch.sum(teacher_probs.float() * log_p, dim=-1)


class DINOLoss(CenteredPrototypeLoss):
    """Cross-entropy between teacher targets and student predictions over ``out_dim`` prototypes.

    For student logits ``s`` and teacher probabilities ``t`` (rows of a batch of size ``B``)::

        CE(s, t) = -1/B * sum_b sum_k t[b, k] * log_softmax(s[b] / student_temp)[k]
        loss     = sum over every (student chunk, teacher chunk) pair of CE(s, t)

    Teacher targets with centering (DINO)::

        t = softmax((teacher_logits - center) / teacher_temp)
        center <- m * center + (1 - m) * mean_b teacher_logits[b]     # mean over the global batch

    ``center`` is a buffer of shape ``(1, out_dim)``, so it is saved in the state_dict. The teacher targets
    (centering, Sinkhorn-Knopp) come from :class:`~dinoscale.losses.center.CenteredPrototypeLoss`.
    """

    fused_center_update = True
    dim_name = "out_dim"

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, student_temp, center_momentum, center_shape=(1, out_dim))

    def forward(
        self,
        student_output_list: Sequence[torch.Tensor],
        teacher_out_softmaxed_centered_list: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Sum over all (student, teacher) pairs of the batch-mean cross-entropy.

        The caller must arrange that a view never supervises itself.
        """
        if len(student_output_list) == 0 or len(teacher_out_softmaxed_centered_list) == 0:
            raise ValueError("DINOLoss needs at least one student output and one teacher output")
        total = None
        for s in student_output_list:
            self._check_last_dim(s, "student output")
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                if t.shape != s.shape:
                    raise ValueError(
                        f"student output {tuple(s.shape)} and teacher target {tuple(t.shape)} differ in shape"
                    )
                term = -torch.sum(t.float() * log_p, dim=-1).mean()
                total = term if total is None else total + term
        return total


def dino_cls_loss(
    loss: DINOLoss,
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    teacher_probs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's [CLS] loss over 2 global and ``n_l`` local crops, with DINOv2's weighting.

    Args:
        loss: the ``DINOLoss`` (gives ``student_temp``).
        student_global: ``(2B, K)`` student logits of the global crops, crop A rows then crop B rows.
        student_local: ``(n_l * B, K)`` student logits of the local crops (crop-major), or None.
        teacher_probs: ``(2B, K)`` teacher targets of the global crops in the same A, B order.

    With ``CE(s, t)`` the batch-mean cross-entropy of :class:`DINOLoss`, ``n_g = 2`` and::

        n_global_terms = (n_g - 1) * n_g = 2
        n_local_terms  = max(n_l * n_g, 1)          # DINOv2 clamps to 1 when there are no local crops
        norm           = n_global_terms + n_local_terms

        global_term = 2 * CE([s_A; s_B], [t_B; t_A]) / norm
                    = (CE(s_A, t_B) + CE(s_B, t_A)) / norm
        local_term  = sum_{i < n_l} (CE(s_local_i, t_A) + CE(s_local_i, t_B)) / norm

    The factor 2 is DINOv2's ``loss_scales``: the two global pairs are evaluated as one
    ``2B``-row mean, which halves them. Teacher crop A supervises student crop B and vice versa,
    so no global view supervises itself. ``local_term`` is a zero tensor without local crops.
    Returns ``(global_term, local_term)``; the total [CLS] loss is their sum.
    """
    n_global = 2
    if teacher_probs.ndim != 2 or student_global.ndim != 2:
        raise ValueError(
            f"dino_cls_loss expects 2-D (rows, K) tensors, got student_global {tuple(student_global.shape)} "
            f"and teacher_probs {tuple(teacher_probs.shape)}"
        )
    if student_global.shape != teacher_probs.shape:
        raise ValueError(
            f"student_global {tuple(student_global.shape)} and teacher_probs {tuple(teacher_probs.shape)} "
            "must have the same shape (2B, K)"
        )
    if teacher_probs.shape[0] == 0 or teacher_probs.shape[0] % n_global != 0:
        raise ValueError(f"teacher_probs must hold 2 global crops of B > 0 rows each, got {teacher_probs.shape[0]} rows")
    batch = teacher_probs.shape[0] // n_global
    teacher_a, teacher_b = teacher_probs.chunk(n_global)

    n_local = 0
    if student_local is not None:
        if student_local.ndim != 2 or student_local.shape[1] != teacher_probs.shape[1]:
            raise ValueError(
                f"student_local must be (n_l * B, K) with K={teacher_probs.shape[1]}, got {tuple(student_local.shape)}"
            )
        if student_local.shape[0] % batch != 0:
            raise ValueError(
                f"student_local has {student_local.shape[0]} rows, not a multiple of the batch size B={batch}"
            )
        n_local = student_local.shape[0] // batch

    n_global_terms = (n_global - 1) * n_global
    n_local_terms = max(n_local * n_global, 1)
    norm = n_global_terms + n_local_terms

    # Swap the teacher halves so that crop A's target is B's teacher output and vice versa.
    swapped = torch.cat([teacher_b, teacher_a])
    loss_scale = 2.0
    global_term = loss([student_global], [swapped]) * loss_scale / norm
    if n_local > 0:
        local_term = loss(list(student_local.chunk(n_local)), [teacher_a, teacher_b]) / norm
    else:
        local_term = global_term.new_zeros(())
    return global_term, local_term
