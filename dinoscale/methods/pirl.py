"""PIRL (Misra & van der Maaten 2020): an image's representation made invariant to its jigsaw transformation.

Views (:class:`JigsawViews`, on the multi-crop augmentation's two global crops, ``crops.global_crops_*``): global
crop 1 is the image view ``I``; global crop 2 (another random resized crop of the same image, with its own flip and
photometry) is resized to ``pirl.jigsaw_size``, cut into a 3x3 grid of cells, and from every cell a random
``pirl.tile_size`` tile is cropped (the paper's 64-px tiles in 85-px cells of a 255-px image: the jitter keeps
tile edges from lining up); the nine tiles are shuffled by a random permutation. The tiles share the crop's
photometry (PIRL also jitters colours per tile).

Networks (no teacher): the ViT backbone ``phi`` (``dinoscale.models.factory``), applied to the image at crop
resolution and to each tile at tile resolution (one multi-crop forward); on their [CLS] tokens
``f = image_head(phi(I))`` (linear, ``pirl.embed_dim``) and ``g = jigsaw_head(concat_k tile_head(phi(tile_k)))``
(the tile features projected to ``pirl.embed_dim``, concatenated in the shuffled tile order, projected again), as
PIRL's heads on ResNet-50's pooled features.

Memory bank (the method's state): ``pirl.bank_size`` unit vectors ``m``, one per dataset index (so the data
loader hands the method each sample's dataset index: ``sample_index = True``; map-style datasets only), drawn at
random once (seeded by ``train.seed``). Each step the loss (``dinoscale.losses.pirl``, ``L = lambda L_NCE(m_I,
g) + (1 - lambda) L_NCE(m_I, f)``) compares ``m_I`` with ``g`` and ``f`` against ``pirl.num_negatives`` entries
drawn uniformly from the bank (one draw for the global batch, seeded by ``train.seed`` and the bank's step count,
so every rank draws the same; an image's own entry is never its negative), then every entry of the global batch
is updated, ``m_I <- normalize(momentum m_I + (1 - momentum) normalize(f(I)))``, ``pirl.bank_momentum`` = 0.5:
each rank gathers the indices and ``f`` of all ranks and applies the same update, so the bank stays identical
on every rank. The bank and its step count are buffers: checkpointed (exact resume) and restored when a step is
skipped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dinoscale import distributed
from dinoscale.data.seeding import derive_seed
from dinoscale.losses.pirl import PIRLLoss
from dinoscale.methods.views import multicrop_transform
from dinoscale.models.factory import build_backbone

__all__ = ["GRID", "JigsawViews", "PIRL", "jigsaw_tiles", "pirl_collate"]

GRID = 3  # PIRL's jigsaw: a 3x3 grid, 9 tiles


def jigsaw_tiles(image: torch.Tensor, jigsaw_size: int, tile_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tiles, cells)``: ``image`` (3, H, W) resized to ``jigsaw_size`` square, one random ``tile_size`` crop in
    each cell of its 3x3 grid (cells of ``jigsaw_size // 3``), shuffled: ``tiles`` (9, 3, t, t), tile ``k`` from
    cell ``cells[k]`` (row-major). Draws from torch's global RNG (the loader seeds it per sample)."""
    cell = jigsaw_size // GRID
    if tile_size > cell:
        raise ValueError(f"pirl.tile_size={tile_size} exceeds the jigsaw cell ({jigsaw_size} // 3 = {cell})")
    if tuple(image.shape[-2:]) != (jigsaw_size, jigsaw_size):
        image = F.interpolate(image[None].float(), size=(jigsaw_size, jigsaw_size), mode="bilinear",
                              antialias=True, align_corners=False)[0].to(image.dtype)
    cells = torch.randperm(GRID * GRID)
    offsets = torch.randint(0, cell - tile_size + 1, (GRID * GRID, 2))
    tiles = []
    for c, (dy, dx) in zip(cells.tolist(), offsets.tolist()):
        top, left = (c // GRID) * cell + dy, (c % GRID) * cell + dx
        tiles.append(image[:, top : top + tile_size, left : left + tile_size])
    return torch.stack(tiles), cells


class JigsawViews:
    """Per-sample transform: ``{"image": global crop 1, "tiles": jigsaw_tiles(global crop 2), "cells": ...}``."""

    def __init__(self, crops: DictConfig, jigsaw_size: int, tile_size: int):
        if crops.photometric_on_device:
            raise ValueError("pirl needs crops.photometric_on_device=false (its tiles are cut in the data loader)")
        if crops.multi_resolution.enabled:
            raise ValueError("pirl's jigsaw tiles have fixed sizes: crops.multi_resolution is not for it")
        self.crops = multicrop_transform(crops, local_crops_number=0)
        self.jigsaw_size = jigsaw_size
        self.tile_size = tile_size

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        image_view, jigsaw_source = self.crops(image)["global_crops"]
        tiles, cells = jigsaw_tiles(jigsaw_source, self.jigsaw_size, self.tile_size)
        return {"image": image_view, "tiles": tiles, "cells": cells}


def pirl_collate(samples: list, *, rng=None) -> dict[str, torch.Tensor]:
    """``(views, label, dataset index)`` samples -> ``images`` (B,3,G,G), ``tiles`` (9B,3,t,t) image-major,
    ``cells`` (B,9), ``indices`` (B,) long, ``labels`` (B,). No batch-level randomness (``rng`` unused)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if any(len(s) != 3 for s in samples):
        raise ValueError("pirl's samples must be (views, label, dataset index): the memory bank is indexed by it "
                         "(the data loader gives it to methods with sample_index = True)")
    views, labels, indices = zip(*samples)
    return {
        "images": torch.stack([v["image"] for v in views]),
        "tiles": torch.cat([v["tiles"] for v in views]),
        "cells": torch.stack([v["cells"] for v in views]),
        "indices": torch.tensor(indices, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _last_occurrence(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct value (an index twice in a batch is updated once, by its
    later sample, the same on every rank)."""
    ordered, order = torch.sort(indices, stable=True)
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


class PIRL(nn.Module):
    """``method: pirl``. Loss terms: ``nce_jigsaw`` (L_NCE(m_I, g)), ``nce_image`` (L_NCE(m_I, f))."""

    uses_teacher = False
    sample_index = True

    def __init__(self, cfg: DictConfig):
        super().__init__()
        c = cfg.pirl
        if c.bank_size < 2 or c.num_negatives < 1 or c.embed_dim < 1:
            raise ValueError(f"pirl needs bank_size >= 2, num_negatives >= 1, embed_dim >= 1, got {c.bank_size}, "
                             f"{c.num_negatives}, {c.embed_dim}")
        if not 0.0 <= c.bank_momentum < 1.0:
            raise ValueError(f"pirl.bank_momentum must lie in [0, 1), got {c.bank_momentum}")
        if c.jigsaw_size < GRID * c.tile_size:
            raise ValueError(f"pirl.jigsaw_size={c.jigsaw_size} is smaller than 3 tiles of {c.tile_size}")
        self.cfg = cfg
        self.loss = PIRLLoss(temperature=c.temperature, jigsaw_weight=c.jigsaw_weight)
        # Allocated by build_networks (a dataset-sized bank is built with the networks, not by a config check).
        self.register_buffer("memory_bank", torch.empty(0, c.embed_dim))
        self.register_buffer("bank_steps", torch.zeros((), dtype=torch.long))

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        """The student (``backbone``, ``image_head``, ``tile_head``, ``jigsaw_head``) and a fresh memory bank."""
        c = self.cfg.pirl
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        backbone.mask_token.requires_grad_(False)  # no masking: it would never get a gradient
        student = nn.ModuleDict({
            "backbone": backbone,
            "image_head": nn.Linear(backbone.embed_dim, c.embed_dim),
            "tile_head": nn.Linear(backbone.embed_dim, c.embed_dim),
            "jigsaw_head": nn.Linear(GRID * GRID * c.embed_dim, c.embed_dim),
        })
        # Its own generator: the same bank on every rank, and the global RNG (the networks' init) untouched.
        g = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, "pirl-memory-bank"))
        self.memory_bank = F.normalize(torch.randn(c.bank_size, c.embed_dim, generator=g), dim=1)
        self.bank_steps = torch.zeros((), dtype=torch.long)
        return student, None

    def build_transform(self) -> JigsawViews:
        return JigsawViews(self.cfg.crops, self.cfg.pirl.jigsaw_size, self.cfg.pirl.tile_size)

    def build_collate(self, patch_size: int):
        for name, size in (("crops.global_crops_size", self.cfg.crops.global_crops_size),
                           ("pirl.tile_size", self.cfg.pirl.tile_size)):
            if size % patch_size:
                raise ValueError(f"{name}={size} is not a multiple of the patch size {patch_size}")
        return pirl_collate

    def negatives(self, device: torch.device) -> torch.Tensor:
        """This step's negative indices: ``num_negatives`` uniform draws from the bank, the same on every rank."""
        seed = derive_seed(self.cfg.train.seed, "pirl-negatives", int(self.bank_steps))
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.memory_bank.shape[0], (self.cfg.pirl.num_negatives,), generator=g).to(device)

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns (loss, {"nce_jigsaw", "nce_image"}) and updates the memory bank; ``sched`` is not used."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("the memory bank is empty: build_networks() allocates it")
        images, tiles, indices = batch["images"], batch["tiles"], batch["indices"]
        n_images = images.shape[0]
        image_out, tile_out = student["backbone"]([images, tiles], is_training=True)
        f = student["image_head"](image_out["x_norm_clstoken"])
        tile_emb = student["tile_head"](tile_out["x_norm_clstoken"])  # (9B, E), image-major, shuffled tile order
        g = student["jigsaw_head"](tile_emb.reshape(n_images, -1))

        all_indices = distributed.all_gather_no_grad(indices)
        if int(all_indices.min()) < 0 or int(all_indices.max()) >= self.memory_bank.shape[0]:
            raise ValueError(f"a sample index lies outside the memory bank of {self.memory_bank.shape[0]} entries: "
                             "set pirl.bank_size to the dataset size")
        negative_idx = self.negatives(images.device)
        positives = self.memory_bank[indices]
        exclude = negative_idx[None, :] == indices[:, None]
        loss, terms = self.loss(f, g, positives, self.memory_bank[negative_idx], exclude)

        with torch.no_grad():  # the memory-bank update, identical on every rank
            all_f = distributed.all_gather_no_grad(F.normalize(f.detach().float(), dim=1))
            keep = _last_occurrence(all_indices)
            rows = all_indices[keep]
            m = self.cfg.pirl.bank_momentum
            self.memory_bank[rows] = F.normalize(m * self.memory_bank[rows] + (1 - m) * all_f[keep], dim=1)
            self.bank_steps += 1
        return loss, terms
