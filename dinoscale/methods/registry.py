"""The methods by name: the config's top-level ``method:`` picks one of ``METHODS``, ``build_method`` builds it.

Adding a method: its module in ``dinoscale/methods/`` (a class keeping the ``Method`` contract of
``dinoscale.methods.base``, built from the config), its loss in ``dinoscale/losses/``, its config section in
``configs/default.yaml`` with recipes under ``configs/methods/``, and one line here.
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from dinoscale.methods.barlow_twins import BarlowTwins
from dinoscale.methods.base import Method
from dinoscale.methods.beit import BEiT
from dinoscale.methods.dino import DINO
from dinoscale.methods.distillation import Distillation
from dinoscale.methods.dinov2 import DINOv2
from dinoscale.methods.ibot import iBOT
from dinoscale.methods.msn import MSN
from dinoscale.methods.pirl import PIRL
from dinoscale.methods.simclr import SimCLR
from dinoscale.methods.simmim import SimMIM

__all__ = ["METHODS", "build_method"]

METHODS: dict[str, Callable[[DictConfig], Method]] = {
    "dinov2": DINOv2,
    "dino": DINO,
    "ibot": iBOT,
    "simclr": SimCLR,
    "barlow_twins": BarlowTwins,
    "simmim": SimMIM,
    "beit": BEiT,
    "msn": MSN,
    "pirl": PIRL,
    "distillation": Distillation,
}

# The methods that take ``gram:`` (the DINOv2 family: its EMA teacher is what the Gram teacher copies).
GRAM_METHODS = frozenset({"dinov2", "dino", "ibot"})


def build_method(cfg: DictConfig) -> Method:
    """The method ``cfg.method`` names, built from ``cfg``."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method '{cfg.method}'; choose one of {sorted(METHODS)}")
    if cfg.gram.enabled and cfg.method not in GRAM_METHODS:
        raise ValueError(f"gram.enabled: Gram anchoring needs an EMA teacher's patch features, method "
                         f"'{cfg.method}' has none; use one of {sorted(GRAM_METHODS)}")
    return METHODS[cfg.method](cfg)
