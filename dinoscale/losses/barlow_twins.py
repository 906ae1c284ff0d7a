"""Barlow Twins redundancy-reduction loss (Zbontar et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn as nn

from dinoscale import distributed

__all__ = ["BarlowTwinsLoss"]


class BarlowTwinsLoss(nn.Module):
    """Push the cross-correlation of two views' embeddings towards the identity.

    For embeddings ``z_a, z_b`` of shape ``(N, D)`` (``N`` = the global batch), each dimension is
    standardised over the batch (batch norm without affine parameters, biased variance)::

        zn[:, i] = (z[:, i] - mean_b z[b, i]) / sqrt(var_b z[b, i] + eps)
        C_ij     = 1/N * sum_b zn_a[b, i] * zn_b[b, j]
        loss     = sum_i (1 - C_ii)^2  +  lambda_offdiag * sum_i sum_{j != i} C_ij^2

    With ``gather_distributed=True`` the embeddings of all ranks are gathered with gradients
    (:func:`dinoscale.distributed.all_gather_with_grad`), so the statistics and ``C`` are those of the global
    batch and every rank computes the same value. The gather's backward sums the ranks' (identical)
    gradients, so averaging the ranks' gradients (data parallel) gives exactly the single-process gradient.
    All ranks must hold the same number of samples. Computed in float32 with autocast disabled.
    """

    def __init__(self, lambda_offdiag: float = 0.0051, eps: float = 1e-5, gather_distributed: bool = True):
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"BarlowTwinsLoss needs lambda_offdiag >= 0, got {lambda_offdiag}")
        if eps <= 0:
            raise ValueError(f"BarlowTwinsLoss needs a positive eps, got {eps}")
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps
        self.gather_distributed = gather_distributed

    def _standardise(self, z: torch.Tensor) -> torch.Tensor:
        centered = z - z.mean(dim=0)
        return centered * torch.rsqrt(centered.square().mean(dim=0) + self.eps)

    def cross_correlation(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """The ``(D, D)`` matrix ``C`` of the global batch (float32)."""
        if z_a.ndim != 2 or z_a.shape != z_b.shape:
            raise ValueError(
                f"BarlowTwinsLoss expects two (batch, dim) tensors of the same shape, got {tuple(z_a.shape)} and "
                f"{tuple(z_b.shape)}"
            )
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z_a, z_b = z_a.float(), z_b.float()
            if self.gather_distributed:
                z_a, z_b = distributed.all_gather_with_grad(z_a), distributed.all_gather_with_grad(z_b)
            n = z_a.shape[0]
            if n < 2:
                raise ValueError(f"BarlowTwinsLoss needs at least 2 samples in the (global) batch, got {n}")
            return self._standardise(z_a).t() @ self._standardise(z_b) / n

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``z_a``, ``z_b``: ``(B, D)`` projector outputs of the two views, row ``i`` of both from the same image."""
        c = self.cross_correlation(z_a, z_b)
        diagonal = torch.diagonal(c)
        on_diag = (1.0 - diagonal).square().sum()
        off_diag = c.square().sum() - diagonal.square().sum()
        return on_diag + self.lambda_offdiag * off_diag

    def extra_repr(self) -> str:
        return f"lambda_offdiag={self.lambda_offdiag}, eps={self.eps}, gather_distributed={self.gather_distributed}"
