"""iBOT masked-patch self-distillation loss (Zhou et al. 2022, as used by DINOv2).

The student sees global crops with some patches masked; for every masked patch it predicts the
teacher's (unmasked) prototype distribution of that patch.
"""

from __future__ import annotations

import torch

from dinoscale.losses.center import CenteredPrototypeLoss
from dinoscale.losses.dino import soft_cross_entropy

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(CenteredPrototypeLoss):  # noqa: N801 - the paper's spelling
    """Masked-patch cross-entropy, each image weighted equally.

    With ``M`` masked patches in total over ``I`` images, patch ``p`` belonging to image
    ``i(p)`` that has ``m_i`` masked patches, student logits ``s_p`` and teacher targets ``t_p``::

        loss = -1/I * sum_p (1 / m_i(p)) * sum_k t_p[k] * log_softmax(s_p / student_temp)[k]

    so every image contributes the mean over its own masked patches, and the result is averaged
    over images (images without masked patches count in ``I`` but add nothing).

    Teacher targets with centering::

        t_p = softmax((teacher_logits_p - center) / teacher_temp)
        center <- m * center + (1 - m) * mean over all masked patches of all ranks

    ``center`` is a buffer of shape ``(1, 1, patch_out_dim)`` (DINOv2's layout), saved in the state_dict. The
    teacher targets (centering, Sinkhorn-Knopp) come from :class:`~dinoscale.losses.center.CenteredPrototypeLoss`;
    a step without masked patches on any rank leaves the center unchanged.
    """

    fused_center_update = False
    dim_name = "patch_out_dim"

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(patch_out_dim, student_temp, center_momentum, center_shape=(1, 1, patch_out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for this rank's masked patches, see :func:`~dinoscale.losses.center.sinkhorn_knopp`.

        ``teacher_output`` is ``(n_masked_local, K)``; ``n_masked_patches_tensor`` (int or
        tensor, not modified) is this rank's number of masked patches, summed over ranks to
        give ``B``. It must equal the number of rows of ``teacher_output``.
        """
        n_local = torch.as_tensor(n_masked_patches_tensor).reshape(-1)
        if n_local.numel() != 1 or int(n_local.item()) != teacher_output.shape[0]:
            raise ValueError(
                f"n_masked_patches_tensor ({n_masked_patches_tensor}) must be the number of rows of "
                f"teacher_output ({teacher_output.shape[0]})"
            )
        return super().sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations)

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss over the masked patches only.

        Args:
            student_patch_tokens_masked: ``(M', K)`` student logits of the masked patches, in the
                row-major order of ``student_masks_flat`` (``M' >= M`` if padded).
            teacher_patch_tokens_masked: ``(M', K)`` teacher targets of the same patches.
            student_masks_flat: ``(I, N)`` boolean mask, True where a patch is masked.
            n_masked_patches: keep only the first ``n_masked_patches`` rows (drops padding); an int
                or a one-element tensor.
            masks_weight: ``(M,)`` weight of each masked patch; defaults to ``1 / m_i`` of its image.
        """
        if student_masks_flat.dtype != torch.bool or student_masks_flat.ndim != 2:
            raise ValueError(
                f"student_masks_flat must be a 2-D bool tensor (images, patches), got dtype "
                f"{student_masks_flat.dtype} and shape {tuple(student_masks_flat.shape)}"
            )
        self._check_last_dim(student_patch_tokens_masked, "student_patch_tokens_masked")
        loss = soft_cross_entropy(student_patch_tokens_masked, teacher_patch_tokens_masked, self.student_temp)
        if n_masked_patches is not None:
            n_masked_patches = int(n_masked_patches)  # also accepts DINOv2's one-element tensor
            if n_masked_patches > loss.shape[0]:
                raise ValueError(
                    f"n_masked_patches={n_masked_patches} exceeds the {loss.shape[0]} rows of the patch tokens"
                )
            loss = loss[:n_masked_patches]
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(dim=-1).clamp(min=1).float()
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if masks_weight.shape != loss.shape:
            raise ValueError(
                f"masks_weight has shape {tuple(masks_weight.shape)} but there are {loss.shape[0]} masked patch losses"
            )
        return torch.sum(loss * masks_weight.to(loss.dtype)) / student_masks_flat.shape[0]
