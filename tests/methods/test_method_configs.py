"""Every method has a Fashion-MNIST config and a ViT-B/14 recipe that load, validate and build."""

import random
import re

import pytest
import torch

from dinoscale.config import CONFIG_DIR, DEFAULT_CONFIG, load_config
from dinoscale.methods.base import uses_sample_index
from dinoscale.methods.registry import METHODS, build_method

# Distillation's configs need a teacher to build, BEiT's a tokenizer (and its recipe is ViT-B/16, the paper's):
# tests/methods/test_distillation.py and test_beit.py check them.
NEW_METHODS = sorted(set(METHODS) - {"dinov2", "distillation", "beit"})


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("scale", ["fmnist", "vitb14"])
def test_config_loads_and_the_method_accepts_it(method, scale):
    cfg = load_config(CONFIG_DIR / "methods" / f"{method}_{scale}.yaml")
    assert cfg.method == method
    built = build_method(cfg)
    built.build_transform()
    built.build_collate(cfg.model.patch_size)  # checks crop sizes and mask cells against the patch size
    if scale == "vitb14":
        assert cfg.model.arch == "vit_base" and cfg.model.patch_size == 14


@pytest.mark.parametrize("method", NEW_METHODS)
def test_fmnist_networks_run_a_step(method):
    cfg = load_config(CONFIG_DIR / "methods" / f"{method}_fmnist.yaml", ["train.autocast=none"])
    built = build_method(cfg)
    torch.manual_seed(0)
    student, teacher = built.build_networks()
    if teacher is not None:
        teacher.load_state_dict(student.state_dict())
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    transform = built.build_transform()
    samples = [(transform(image), 0, i) if uses_sample_index(built) else (transform(image), 0) for i in range(4)]
    batch = built.build_collate(cfg.model.patch_size)(samples, rng=random.Random(0))
    loss, terms = built(student, teacher, batch, {"teacher_temp": 0.04})
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    loss.backward()


def test_method_sections_are_documented():
    text = DEFAULT_CONFIG.read_text()
    for section in ("simclr", "barlow_twins", "simmim", "beit", "msn", "pirl", "distillation"):
        body = re.search(rf"^{section}:\n((?:  .*\n)+)", text, flags=re.M)
        assert body, section
        for line in body.group(1).splitlines():
            assert "#" in line, f"{section}: undocumented key: {line.strip()}"
    for method in METHODS:
        assert method in text.split("\nmodel:")[0], f"the method: comment does not list {method}"
