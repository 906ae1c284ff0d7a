"""BEiT's masked image modelling loss: cross-entropy of the visual tokens of the masked patches (Bao et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BEiTLoss"]


class BEiTLoss(nn.Module):
    """Mean cross-entropy between the predicted token distributions of the masked patches and their visual tokens.

    For the set ``M`` of masked ``(image, patch)`` pairs, the prediction head's logits ``z_i`` over the ``K``
    visual tokens and the tokenizer's token ``t_i`` of the uncorrupted image at each ``i`` in ``M``::

        L = 1/|M| * sum_{i in M} -log softmax(z_i)[t_i]
          = 1/|M| * sum_{i in M} ( log sum_k exp(z_ik) - z_{i, t_i} )

    (BERT's masked-token loss; visible patches do not enter it). :meth:`forward` takes the rows of the masked
    patches only and divides their sum by ``n_total`` (default: the number of rows). A method split over ``W``
    ranks passes ``n_total = |M| / W`` with ``|M|`` the masked patches of the global batch: the ranks' losses
    then average to ``L`` of the global batch, and so do their gradients, however the masked patches fall on the
    ranks. Returns ``(L, {"ce_masked": L, "token_acc": share of the masked patches whose most likely token is
    t_i, normalised the same way})``. Computed in float32 with autocast off.

    Example::

        >>> import math, torch
        >>> from dinoscale.losses.beit import BEiTLoss
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])   # two masked patches, K = 3 tokens
        >>> targets = torch.tensor([0, 2])
        >>> loss, terms = BEiTLoss()(logits, targets)
        >>> expected = ((math.log(math.exp(2) + 2) - 2) + math.log(3)) / 2
        >>> round(loss.item(), 6) == round(expected, 6), terms["token_acc"].item()   # argmax of row 2 is token 0
        (True, 0.5)
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                n_total: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``logits`` ``(M, K)`` of the masked patches, ``targets`` ``(M,)`` long token ids; ``n_total`` what the
        sums are divided by (a number or a 0-d tensor; ``None``: ``M``)."""
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"logits must be (M, K) and targets (M,), got {tuple(logits.shape)} and "
                             f"{tuple(targets.shape)}")
        if targets.dtype != torch.long:
            raise ValueError(f"targets must be long token ids, got {targets.dtype}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            denominator = torch.as_tensor(logits.shape[0] if n_total is None else n_total, dtype=torch.float32,
                                          device=logits.device).clamp(min=1e-12)
            # An empty set of rows gives 0 (a sum over nothing), never 0/0.
            loss = F.cross_entropy(logits, targets, reduction="sum") / denominator
            correct = (logits.detach().argmax(dim=1) == targets).sum().float() / denominator
        return loss, {"ce_masked": loss.detach(), "token_acc": correct}
