"""PIRL loss: an image's memory-bank entry against its jigsaw and image embeddings (Misra & van der Maaten 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PIRLLoss"]


class PIRLLoss(nn.Module):
    """Two noise-contrastive terms of the memory-bank entries ``m_i`` of ``B`` images::

        L = lambda * 1/B sum_i l(m_i, g_i) + (1 - lambda) * 1/B sum_i l(m_i, f_i)

        l(m, q) = -log( exp(<m, q>/tau) / (exp(<m, q>/tau) + sum_{j=1..N, n_j != m} exp(<n_j, q>/tau)) )

    with ``f_i`` the image embedding f(v_I), ``g_i`` the jigsaw embedding g(v_It) (both L2-normalised here),
    ``m_i`` the image's own memory-bank entry (the positive) and ``n_1..n_N`` memory-bank entries of other images
    (the negatives), all unit vectors; ``tau = temperature``, ``lambda = jigsaw_weight`` (PIRL: 0.5, 0.07).
    ``exclude`` ``(B, N)`` marks the negatives that are image ``i``'s own entry (left out of its sum).

    The paper writes each term as the binary noise-contrastive estimator of Wu et al. (2018); this is the
    softmax form of the same comparison (the positive's score against the ``N`` negatives' scores), which needs
    no estimate of Wu et al.'s normalising constant. Memory-bank entries carry no gradient: the loss is
    differentiated through ``f`` and ``g`` only. ``forward`` returns ``(L, {"nce_jigsaw": mean l(m, g),
    "nce_image": mean l(m, f)})``. Computed in float32 with autocast disabled.

    Example::

        >>> loss = PIRLLoss(temperature=0.07, jigsaw_weight=0.5)
        >>> f, g = torch.randn(4, 16), torch.randn(4, 16)
        >>> bank = F.normalize(torch.randn(100, 16), dim=1)
        >>> value, terms = loss(f, g, bank[:4], bank[4:36])
        >>> value.shape, sorted(terms)
        (torch.Size([]), ['nce_image', 'nce_jigsaw'])
    """

    def __init__(self, temperature: float = 0.07, jigsaw_weight: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"PIRLLoss needs a positive temperature, got {temperature}")
        if not 0.0 <= jigsaw_weight <= 1.0:
            raise ValueError(f"PIRLLoss needs jigsaw_weight (lambda) in [0, 1], got {jigsaw_weight}")
        self.temperature = temperature
        self.jigsaw_weight = jigsaw_weight

    def nce(self, positives: torch.Tensor, queries: torch.Tensor, negatives: torch.Tensor,
            exclude: torch.Tensor | None) -> torch.Tensor:
        """``l(m_i, q_i)`` averaged over ``i``; ``queries`` unit vectors."""
        pos = (positives * queries).sum(dim=1, keepdim=True)  # (B, 1)
        neg = queries @ negatives.t()  # (B, N)
        if exclude is not None:
            neg = neg.masked_fill(exclude, float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return -F.log_softmax(logits, dim=1)[:, 0].mean()

    def forward(
        self,
        image_emb: torch.Tensor,
        jigsaw_emb: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``image_emb``, ``jigsaw_emb`` ``(B, D)`` (any norm); ``positives`` ``(B, D)`` and ``negatives``
        ``(N, D)`` memory-bank rows (unit norm); ``exclude`` optional bool ``(B, N)``."""
        if image_emb.ndim != 2 or image_emb.shape != jigsaw_emb.shape or positives.shape != image_emb.shape:
            raise ValueError(
                f"PIRLLoss expects (B, D) image, jigsaw and positive embeddings of one shape, got "
                f"{tuple(image_emb.shape)}, {tuple(jigsaw_emb.shape)}, {tuple(positives.shape)}"
            )
        if negatives.ndim != 2 or negatives.shape[1] != image_emb.shape[1] or negatives.shape[0] == 0:
            raise ValueError(f"PIRLLoss expects (N >= 1, {image_emb.shape[1]}) negatives, got {tuple(negatives.shape)}")
        if exclude is not None and exclude.shape != (image_emb.shape[0], negatives.shape[0]):
            raise ValueError(f"exclude must be (B, N) = {(image_emb.shape[0], negatives.shape[0])}, "
                             f"got {tuple(exclude.shape)}")
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            f = F.normalize(image_emb.float(), dim=1)
            g = F.normalize(jigsaw_emb.float(), dim=1)
            m, n = positives.detach().float(), negatives.detach().float()
            nce_jigsaw = self.nce(m, g, n, exclude)
            nce_image = self.nce(m, f, n, exclude)
            loss = self.jigsaw_weight * nce_jigsaw + (1.0 - self.jigsaw_weight) * nce_image
        return loss, {"nce_jigsaw": nce_jigsaw.detach(), "nce_image": nce_image.detach()}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, jigsaw_weight={self.jigsaw_weight}"
