"""Self-supervised methods. Each module declares its networks, views and loss; the engine is shared.

The config's top-level ``method:`` names one of ``METHODS``. A method is an ``nn.Module`` (its loss buffers are
checkpointed) with ``uses_teacher``, ``build_networks()``, ``build_transform()``, ``build_collate(patch_size)`` and
``forward(student, teacher, batch, sched) -> (loss, terms)``; see ``dinov2.DINOv2``. Methods without an EMA
teacher return ``None`` as teacher; evaluation and export then use the student's backbone.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from dinoscale.methods.barlow_twins import BarlowTwins
from dinoscale.methods.dino import DINO
from dinoscale.methods.dinov2 import DINOv2
from dinoscale.methods.ibot import iBOT
from dinoscale.methods.msn import MSN
from dinoscale.methods.simclr import SimCLR
from dinoscale.methods.simmim import SimMIM

METHODS: dict[str, type[nn.Module]] = {
    "dinov2": DINOv2,
    "dino": DINO,
    "ibot": iBOT,
    "simclr": SimCLR,
    "barlow_twins": BarlowTwins,
    "simmim": SimMIM,
    "msn": MSN,
}


def build_method(cfg: DictConfig) -> nn.Module:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method '{cfg.method}'; choose one of {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)
