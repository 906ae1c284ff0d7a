"""DINO (Caron et al. 2021): self-distillation of the [CLS] token over multi-crop views, nothing else.

The DINOv2 method with the masked-patch (iBOT) loss and the KoLeo regulariser switched off: the student
sees unmasked global and local crops, the EMA teacher the global crops, and the loss is DINOv2's [CLS]
cross-entropy (same pairing and weighting as DINO's: every (teacher global, other student view) pair,
averaged). Heads, centering (``dino.centering``), temperatures and schedules come from the ``dino:``,
``teacher:`` and ``crops:`` config sections; ``ibot:`` is ignored.
"""

from __future__ import annotations

from dinoscale.methods.dinov2 import DINOv2


class DINO(DINOv2):
    """``method: dino``. Loss terms: ``dino_global``, ``dino_local``."""

    use_ibot = False
    use_koleo = False
