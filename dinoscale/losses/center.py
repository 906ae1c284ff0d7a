"""Teacher targets over prototypes, shared by DINO's [CLS] loss and iBOT's patch loss.

The teacher's prototype scores become target distributions in one of two ways:

* centering (DINO): ``softmax((logits - center) / teacher_temp)``, with ``center`` an EMA of the mean
  teacher logits over all ranks (:func:`softmax_center`, :func:`update_center_`);
* Sinkhorn-Knopp (SwAV, DINOv2): an equipartition of the global batch over the prototypes
  (:func:`sinkhorn_knopp`).

:class:`CenteredPrototypeLoss` is the base of ``DINOLoss`` and ``iBOTPatchLoss``: the student temperature, the
center buffer and the teacher-target methods they share. The collectives run in a single process as well
(``dinoscale.distributed`` is then a no-op).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoscale import distributed

__all__ = ["CenteredPrototypeLoss", "global_mean", "sinkhorn_knopp", "softmax_center", "update_center_"]


@torch.no_grad()
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``softmax((teacher_logits - center) / teacher_temp)`` over the last dimension, in float32.

    ``teacher_logits`` is ``(..., K)``; ``center`` holds ``K`` values in any layout (``(1, K)``, ``(1, 1, K)``),
    flattened here so that the output keeps the input's shape.
    """
    return F.softmax((teacher_logits.float() - center.reshape(-1)) / teacher_temp, dim=-1)


@torch.no_grad()
def global_mean(rows: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the ``(..., dim)`` rows of all ranks, ``(dim,)`` float32, and their number (a 0-d tensor).

    Sum and row count travel in one all-reduce, so ranks with different numbers of rows are weighted by them.
    Without any row on any rank the mean is 0 (no division by zero) and the count 0.
    """
    flat = rows.reshape(-1, dim).float()
    totals = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
    distributed.all_reduce_sum_(totals)
    count = totals[-1]
    return totals[:-1] / count.clamp(min=1.0), count


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float, *, fused: bool) -> None:
    """``center <- momentum * center + (1 - momentum) * mean``, ``mean`` over all ranks' ``(..., K)`` logits.

    ``center`` holds ``K`` values in any layout and is updated in place. When no rank has a row (an iBOT step
    without masked patches) it is left unchanged; ``torch.where`` instead of an ``if`` keeps this free of a
    host-device sync.

    ``fused`` chooses how the sum is rounded: ``True`` adds ``(1 - momentum) * mean`` in one multiply-add
    (``Tensor.add_(alpha=)``, DINOLoss's form); ``False`` rounds both products before the sum (DINOv2's
    ``center * m + mean * (1 - m)``, iBOTPatchLoss's form). The two differ in the last bit, so each loss keeps
    its own and runs reproduce their losses and checkpoints exactly.
    """
    batch_mean, count = global_mean(teacher_logits, center.shape[-1])
    batch_mean = batch_mean.reshape(center.shape)
    if fused:
        updated = center.mul(momentum).add_(batch_mean, alpha=1.0 - momentum)
    else:
        updated = center * momentum + batch_mean * (1.0 - momentum)
    center.copy_(torch.where(count > 0, updated, center))


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: torch.Tensor, teacher_temp: float, n_local_samples, n_iterations: int = 3
) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignment of samples to prototypes, exact across ranks.

    With ``Q = exp(teacher_output / teacher_temp)^T`` of shape ``(K, B_local)`` and
    ``B = sum over ranks of n_local_samples``::

        Q <- Q / sum(Q)                               # global sum
        repeat n_iterations:
            Q[k, :] <- Q[k, :] / (K * sum_b Q[k, b])  # each prototype gets mass 1/K (global row sums)
            Q[:, b] <- Q[:, b] / (B * sum_k Q[k, b])  # each sample gets mass 1/B
        return (B * Q)^T                              # (B_local, K), every row sums to 1

    The last step normalises the samples, so each output row sums to 1 exactly; the
    prototype marginals ``sum_b out[b, k]`` approach ``B / K`` as the iterations converge.
    The scores are shifted by their global maximum before ``exp``; the shift is a constant
    factor on ``Q`` that the first normalisation removes, and it keeps ``exp`` finite at low
    temperatures.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    if teacher_output.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects a (samples, prototypes) tensor, got shape {tuple(teacher_output.shape)}")
    scores = teacher_output.float() / teacher_temp
    local_max = scores.max().reshape(1) if scores.numel() > 0 else scores.new_full((1,), float("-inf"))
    global_max = distributed.all_gather_no_grad(local_max).max()
    q = torch.exp(scores - global_max).t()  # (K, B_local)
    n_prototypes = q.shape[0]

    # One collective for the global sum of Q and the global number of samples.
    totals = torch.stack([q.sum(), torch.as_tensor(n_local_samples, dtype=q.dtype, device=q.device)])
    distributed.all_reduce_sum_(totals)
    sum_q, n_samples = totals[0], totals[1]
    q /= sum_q
    for _ in range(n_iterations):
        row_sums = distributed.all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= row_sums * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * n_samples
    q *= n_samples
    return q.t()


class CenteredPrototypeLoss(nn.Module):
    """Base of the cross-entropies between student and teacher distributions over ``K`` prototypes.

    Holds ``student_temp``, ``center_momentum`` and the buffer ``center`` (zeros of ``center_shape``, whose last
    dimension is ``K``), which is in the state_dict and so checkpointed with the method. Subclasses set
    ``fused_center_update`` (see :func:`update_center_`) and ``dim_name``, their constructor's name for ``K``
    (used in error messages).

    In a step, call :meth:`softmax_center_teacher` before :meth:`update_center`: the targets then use the center
    of the previous steps, as DINOv2's deferred update does.
    """

    fused_center_update: bool
    dim_name: str

    def __init__(self, n_prototypes: int, student_temp: float, center_momentum: float, center_shape: tuple):
        super().__init__()
        name = type(self).__name__
        if n_prototypes <= 0:
            raise ValueError(f"{name} needs a positive {self.dim_name}, got {n_prototypes}")
        if student_temp <= 0:
            raise ValueError(f"{name} needs a positive student_temp, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"{name} needs center_momentum in [0, 1], got {center_momentum}")
        self.n_prototypes = n_prototypes
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))

    def _check_last_dim(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.shape[-1] != self.n_prototypes:
            raise ValueError(
                f"{what} has last dimension {tensor.shape[-1]}, expected {self.dim_name}={self.n_prototypes}"
            )

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centered targets :func:`softmax_center` of ``(..., K)`` teacher logits (same shape, float32)."""
        self._check_last_dim(teacher_logits, "teacher output")
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA update of ``center`` with the mean of all ranks' ``(..., K)`` teacher logits (:func:`update_center_`)."""
        self._check_last_dim(teacher_logits, "teacher output")
        update_center_(self.center, teacher_logits, self.center_momentum, fused=self.fused_center_update)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets ``(B_local, K)`` of ``(B_local, K)`` teacher logits, see :func:`sinkhorn_knopp`.

        ``B`` is the global number of rows (local rows summed over ranks).
        """
        self._check_last_dim(teacher_logits, "teacher output")
        return sinkhorn_knopp(teacher_logits, teacher_temp, teacher_logits.shape[0], n_iterations)
