"""KoLeo regulariser: Kozachenko-Leonenko differential-entropy estimate (Sablayrolles et al. 2019).

Pushes each feature away from its nearest neighbour in the batch, spreading features uniformly
on the sphere. DINOv2 applies it to the student's [CLS] features of each global crop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoscale import distributed

__all__ = ["KoLeoLoss", "nearest_neighbour_indices"]


@torch.no_grad()
def nearest_neighbour_indices(queries: torch.Tensor, candidates: torch.Tensor, self_offset: int = 0) -> torch.Tensor:
    """Index into ``candidates`` of each query's nearest neighbour, excluding the query itself.

    Both inputs are L2-normalised, so the nearest neighbour is the largest dot product. Query
    ``i`` is ``candidates[self_offset + i]`` and is excluded.
    """
    dots = queries @ candidates.t()  # (n, N)
    rows = torch.arange(queries.shape[0], device=queries.device)
    # -inf rather than DINOv2's -1: an antipodal point (dot = -1) must still beat the query itself.
    dots[rows, rows + self_offset] = float("-inf")
    return dots.argmax(dim=1)


class KoLeoLoss(nn.Module):
    """KoLeo loss on L2-normalised features ``x_1..x_n``::

        L = -1/n * sum_i log(min_{j != i} ||x_i - x_j||_2 + eps)

    The neighbour is found by the largest dot product (diagonal excluded); the distance is
    ``F.pairwise_distance`` (which adds ``eps`` to the difference, as DINOv2's ``PairwiseDistance``).

    With ``distributed=True`` the neighbours of this rank's ``n`` samples are searched in the
    features gathered from all ranks (with gradient), and ``L`` is averaged over this rank's
    samples. Averaging the ranks' gradients (data parallel) then gives exactly the gradient of
    the single-process loss on the global batch. All ranks must pass the same number of samples.
    The computation runs in float32 with autocast disabled.
    """

    def __init__(self, distributed: bool = False, eps: float = 1e-8):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"KoLeoLoss needs a positive eps, got {eps}")
        self.distributed = distributed
        self.eps = eps

    def forward(self, student_output: torch.Tensor) -> torch.Tensor:
        if student_output.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (batch, dim) features, got shape {tuple(student_output.shape)}")
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=self.eps)
            if self.distributed:
                candidates = distributed.all_gather_with_grad(x)
                offset = distributed.get_rank() * x.shape[0]
            else:
                candidates, offset = x, 0
            if candidates.shape[0] < 2:
                raise ValueError(
                    f"KoLeoLoss needs at least 2 samples to find a nearest neighbour, got {candidates.shape[0]}"
                )
            if x.shape[0] == 0:
                raise ValueError("KoLeoLoss got an empty batch on this rank")
            idx = nearest_neighbour_indices(x.detach(), candidates.detach(), offset)
            distances = F.pairwise_distance(x, candidates[idx], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
