"""Fixtures of the training-performance tests: a tiny DINOv2 (its config overrides, method, networks, batch)."""

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.train.perf import flops

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.img_size=16",
    "model.drop_path_rate=0.1",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=48", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=48", "ibot.head_bottleneck_dim=16",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
]


@pytest.fixture()
def tiny_overrides():
    """Config overrides of the tiny DINOv2; tests hand them to the processes they spawn (no fixtures there)."""
    return list(TINY)


@pytest.fixture()
def tiny_dinov2(tiny_overrides):
    flops.clear_flops_cache()
    cfg = load_config("quickstart", tiny_overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    batch = flops.example_batch(method, patch_size=4, batch_size=4, image_size=32)
    return cfg, method, student, teacher, batch
