"""SimMIM masked-image-modelling loss: L1 reconstruction of the masked patches' pixels (Xie et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SimMIMLoss", "patchify"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)``: patches in row-major order (the ViT's token order), each
    flattened as ``(row, column, channel)``."""
    if images.ndim != 4:
        raise ValueError(f"patchify expects images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if h % p != 0 or w % p != 0:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class SimMIMLoss(nn.Module):
    """Mean absolute error between predicted and true pixels, over the masked patches only.

    For predictions ``y`` and targets ``x`` of shape ``(B, N, P)`` (``P = p*p*C`` pixel values per patch) and
    the set ``M`` of masked ``(image, patch)`` pairs::

        loss = 1 / (|M| * P) * sum_{(b, n) in M} sum_k |y[b, n, k] - x[b, n, k]|

    With ``norm_target=True`` each target patch is first standardised with its own statistics::

        x[b, n] <- (x[b, n] - mean_k x[b, n, k]) / sqrt(var_k x[b, n, k] + eps)      (biased variance)

    Visible patches do not enter the loss (SimMIM's finding: predicting them hurts). Each rank averages over its
    own masked patches, as the reference implementation does per GPU. Computed in float32 with autocast off.
    """

    def __init__(self, norm_target: bool = False, eps: float = 1e-6):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"SimMIMLoss needs a positive eps, got {eps}")
        self.norm_target = norm_target
        self.eps = eps

    def target(self, patches: torch.Tensor) -> torch.Tensor:
        """The regression target of ``(..., P)`` pixel patches (standardised per patch if ``norm_target``)."""
        if not self.norm_target:
            return patches
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, unbiased=False, keepdim=True)
        return (patches - mean) * torch.rsqrt(var + self.eps)

    def forward(self, pred: torch.Tensor, target_patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target_patches``: ``(B, N, P)`` (see :func:`patchify`); ``masks``: bool ``(B, N)``,
        True = masked."""
        if pred.shape != target_patches.shape or pred.ndim != 3:
            raise ValueError(
                f"pred and target_patches must both be (B, N, P), got {tuple(pred.shape)} and "
                f"{tuple(target_patches.shape)}"
            )
        if masks.dtype != torch.bool or tuple(masks.shape) != tuple(pred.shape[:2]):
            raise ValueError(f"masks must be a bool tensor of shape {tuple(pred.shape[:2])}, got "
                             f"{masks.dtype} {tuple(masks.shape)}")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            error = (pred.float() - self.target(target_patches.float())).abs().sum(dim=-1)  # (B, N)
            weights = masks.to(error.dtype)
            # Multiplying by the mask instead of indexing avoids a device sync; an empty mask gives 0, not 0/0.
            return (error * weights).sum() / (weights.sum() * pred.shape[-1]).clamp(min=1.0)

    def extra_repr(self) -> str:
        return f"norm_target={self.norm_target}, eps={self.eps}"
