"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoscale import distributed

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """Contrastive loss over two views ``z_a, z_b`` of the same ``N`` images (``N`` = the global batch).

    With ``u_1..u_2N`` the L2-normalised embeddings of both views, ``p(i)`` the other view of sample ``i`` and
    ``tau`` the temperature::

        l_i  = -log( exp(u_i . u_p(i) / tau) / sum_{k != i} exp(u_i . u_k / tau) )
        loss = 1/2N * sum_i l_i

    so each embedding has one positive and ``2N - 2`` negatives. With ``gather_distributed=True`` the
    candidates ``u_k`` are gathered from all ranks with :func:`dinoscale.distributed.all_gather_with_grad`
    and every rank averages ``l_i`` over its own ``2B`` embeddings; averaging the ranks' gradients (data
    parallel) then gives exactly the gradient of the single-process loss on the global batch. All ranks must
    hold the same number of samples. Computed in float32 with autocast disabled.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NTXentLoss needs a positive temperature, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``z_a``, ``z_b``: ``(B, D)`` embeddings of the two views, row ``i`` of both from the same image."""
        if z_a.ndim != 2 or z_a.shape != z_b.shape:
            raise ValueError(
                f"NTXentLoss expects two (batch, dim) tensors of the same shape, got {tuple(z_a.shape)} and "
                f"{tuple(z_b.shape)}"
            )
        batch = z_a.shape[0]
        if batch == 0:
            raise ValueError("NTXentLoss got an empty batch")
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            u_a = F.normalize(z_a.float(), dim=1)
            u_b = F.normalize(z_b.float(), dim=1)
            if self.gather_distributed:
                all_a, all_b = distributed.all_gather_with_grad(u_a), distributed.all_gather_with_grad(u_b)
                offset = distributed.get_rank() * batch
            else:
                all_a, all_b, offset = u_a, u_b, 0
            n_global = all_a.shape[0]
            if n_global < 2:
                raise ValueError("NTXentLoss needs at least 2 images in the (global) batch to have negatives")
            anchors = torch.cat([u_a, u_b])  # (2B, D): this rank's view-a rows, then its view-b rows
            candidates = torch.cat([all_a, all_b])  # (2N, D): all view-a rows, then all view-b rows
            logits = anchors @ candidates.t() / self.temperature

            own = torch.arange(batch, device=z_a.device) + offset  # global index of this rank's samples
            self_index = torch.cat([own, own + n_global])
            positive_index = torch.cat([own + n_global, own])
            is_self = F.one_hot(self_index, num_classes=2 * n_global).bool()
            logits = logits.masked_fill(is_self, float("-inf"))  # an embedding is never its own negative
            return F.cross_entropy(logits, positive_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
