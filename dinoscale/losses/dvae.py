"""The discrete VAE's training loss: reconstruction plus a KL divergence to the uniform prior (DALL-E's dVAE)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DVAELoss"]

RECONSTRUCTIONS = ("mse", "l1")


class DVAELoss(nn.Module):
    """For images ``x`` ``(B, C, H, W)``, their reconstruction ``x_hat`` through the Gumbel-softmax relaxation and
    the encoder's logits ``l`` ``(B, K, h, w)`` over the ``K`` tokens::

        L    = rec(x_hat, x) + beta * KL
        rec  = 1/(B C H W) sum (x_hat - x)^2              (``reconstruction="mse"``; ``"l1"``: |x_hat - x|)
        KL   = 1/(B h w) sum_{b,i,j} KL(q_bij || U_K),    q_bij = softmax_k(l[b, :, i, j])
             = 1/(B h w) sum_{b,i,j} sum_k q_bijk (log q_bijk + log K)

    the ELBO of DALL-E's dVAE with a uniform prior over the tokens of each cell, the reconstruction term taken as
    a squared (or absolute) error on the normalised pixels instead of DALL-E's logit-Laplace likelihood.
    ``beta`` (``kl_weight``) may change from step to step (DALL-E raises it over the first updates): pass it to
    :meth:`forward`. ``KL`` lies in ``[0, log K]``: 0 when every cell is undecided, ``log K`` when every cell is
    certain. Returns ``(L, {"reconstruction": rec, "kl": KL})``; computed in float32 with autocast off.

    Example::

        >>> import torch
        >>> from dinoscale.losses.dvae import DVAELoss
        >>> x = torch.zeros(1, 1, 2, 2)
        >>> x_hat = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]])    # squared errors 1, 0, 0, 1: mean 0.5
        >>> logits = torch.zeros(1, 4, 1, 1)                        # one undecided cell over 4 tokens: KL = 0
        >>> loss, terms = DVAELoss()(x_hat, x, logits, kl_weight=0.1)
        >>> round(loss.item(), 6), round(terms["kl"].item(), 6)
        (0.5, 0.0)
        >>> certain = torch.tensor([0.0, -1e4, -1e4, -1e4]).view(1, 4, 1, 1)   # KL = log 4
        >>> round(DVAELoss()(x_hat, x, certain, kl_weight=0.1)[0].item(), 6)  # 0.5 + 0.1 * log 4
        0.638629
    """

    def __init__(self, reconstruction: str = "mse"):
        super().__init__()
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"DVAELoss reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
        self.reconstruction = reconstruction

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor, logits: torch.Tensor,
                kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if reconstruction.shape != target.shape:
            raise ValueError(f"the reconstruction {tuple(reconstruction.shape)} and the images "
                             f"{tuple(target.shape)} differ in shape")
        if logits.ndim != 4 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"logits must be (B, K, h, w) for B = {target.shape[0]} images, got {tuple(logits.shape)}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        with torch.autocast(device_type=target.device.type, enabled=False):
            error = reconstruction.float() - target.float()
            rec = error.square().mean() if self.reconstruction == "mse" else error.abs().mean()
            log_q = F.log_softmax(logits.float(), dim=1)
            kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(dim=1).mean()
            return rec + kl_weight * kl, {"reconstruction": rec.detach(), "kl": kl.detach()}

    def extra_repr(self) -> str:
        return f"reconstruction={self.reconstruction!r}"
