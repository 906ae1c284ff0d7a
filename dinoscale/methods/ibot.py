"""iBOT (Zhou et al. 2022): [CLS] self-distillation plus masked-patch self-distillation ("online tokenizer").

The DINOv2 method without the KoLeo regulariser: the student sees block-masked global crops (``ibot.mask_*``)
and unmasked local crops; it predicts the EMA teacher's [CLS] distribution of the other global crop and the
teacher's patch distributions at its masked positions. ``ibot.separate_head`` chooses a shared head (iBOT's
ViT recipes) or a separate patch head.
"""

from __future__ import annotations

from dinoscale.methods.dinov2 import DINOv2


class iBOT(DINOv2):  # noqa: N801 - the paper's spelling
    """``method: ibot``. Loss terms: ``dino_global``, ``dino_local``, ``ibot``."""

    use_koleo = False
