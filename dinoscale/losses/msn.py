"""MSN loss: masked anchors matched to an unmasked target over learnable prototypes (Assran et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoscale import distributed

__all__ = ["MSNLoss"]


class MSNLoss(nn.Module):
    """Cross-entropy between sharpened target assignments and anchor assignments, with mean-entropy maximisation.

    Inputs are cosine similarities to the ``K`` prototypes (``s = normalize(z) @ normalize(prototypes).T``):
    ``anchor_sims`` ``(V*B, K)`` for ``V`` anchor views of ``B`` images (view-major: all images' view 0, then
    view 1, ...), ``target_sims`` ``(B, K)`` for the target view. With ``tau = temperature`` and
    ``T = target_temperature``::

        p_v,b = softmax(anchor_sims[v, b] / tau)                       anchor assignments
        t_b   = softmax(target_sims[b] / tau) ** (1 / T), renormalised  sharpened target (no gradient)
        CE    = 1/(V*B) * sum_{v,b} sum_k -t_b[k] * log p_v,b[k]
        p_bar = mean of p_v,b over all anchors of all ranks
        H     = -sum_k p_bar[k] * log p_bar[k]
        loss  = CE - me_max_weight * H

    Sharpening is the same as a target softmax at temperature ``tau * T`` (0.025 with MSN's 0.1 and 0.25).
    MSN's code writes the regulariser as ``log K - H`` (>= 0); the constant changes no gradient and is left out.

    ``p_bar`` is averaged over the global batch: each rank's mean is gathered with gradients
    (:func:`dinoscale.distributed.all_gather_with_grad`), so the regulariser is that of the global batch on
    every rank, and with the per-rank mean cross-entropy, averaging the ranks' gradients (data parallel) gives
    exactly the single-process gradient. All ranks must hold the same number of anchors. ``forward`` returns
    ``(loss, {"ce": CE, "entropy": H})``. Computed in float32 with autocast disabled.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        target_temperature: float = 0.25,
        me_max_weight: float = 1.0,
        gather_distributed: bool = True,
    ):
        super().__init__()
        if temperature <= 0 or target_temperature <= 0:
            raise ValueError(
                f"MSNLoss needs positive temperatures, got temperature={temperature}, "
                f"target_temperature={target_temperature}"
            )
        if me_max_weight < 0:
            raise ValueError(f"MSNLoss needs me_max_weight >= 0, got {me_max_weight}")
        self.temperature = temperature
        self.target_temperature = target_temperature
        self.me_max_weight = me_max_weight
        self.gather_distributed = gather_distributed

    @torch.no_grad()
    def target_probs(self, target_sims: torch.Tensor) -> torch.Tensor:
        """Sharpened target assignments ``t`` ``(B, K)``; ``p ** (1/T)`` renormalised is a softmax at ``tau * T``."""
        return F.softmax(target_sims.float() / (self.temperature * self.target_temperature), dim=-1)

    def forward(self, anchor_sims: torch.Tensor, target_sims: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if anchor_sims.ndim != 2 or target_sims.ndim != 2 or anchor_sims.shape[1] != target_sims.shape[1]:
            raise ValueError(
                f"MSNLoss expects (V*B, K) anchor and (B, K) target similarities, got {tuple(anchor_sims.shape)} "
                f"and {tuple(target_sims.shape)}"
            )
        batch = target_sims.shape[0]
        if batch == 0 or anchor_sims.shape[0] % batch != 0:
            raise ValueError(
                f"anchor_sims has {anchor_sims.shape[0]} rows, not a positive multiple of the {batch} target rows"
            )
        n_views = anchor_sims.shape[0] // batch
        with torch.autocast(device_type=anchor_sims.device.type, enabled=False):
            targets = self.target_probs(target_sims).repeat(n_views, 1)  # row v*B + b is image b's target
            log_p = F.log_softmax(anchor_sims.float() / self.temperature, dim=-1)
            ce = -(targets * log_p).sum(dim=-1).mean()

            mean_p = log_p.exp().mean(dim=0, keepdim=True)
            if self.gather_distributed:
                mean_p = distributed.all_gather_with_grad(mean_p).mean(dim=0, keepdim=True)
            # xlogy: 0 * log 0 = 0 for prototypes that no anchor uses.
            entropy = -torch.special.xlogy(mean_p, mean_p).sum()
            loss = ce - self.me_max_weight * entropy
        return loss, {"ce": ce.detach(), "entropy": entropy.detach()}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, target_temperature={self.target_temperature}, "
                f"me_max_weight={self.me_max_weight}, gather_distributed={self.gather_distributed}")
