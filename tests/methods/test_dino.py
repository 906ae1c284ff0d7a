import random

import torch

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.methods.dinov2 import DINOv2


def test_dino_is_dinov2_without_ibot_and_koleo():
    cfg = load_config("quickstart", ["method=dino", "ibot.separate_head=true"])
    method = build_method(cfg)
    assert isinstance(method, DINOv2) and method.uses_teacher
    assert set(method.state_dict()) == {"dino_loss.center"}  # no iBOT center to checkpoint
    student, teacher = method.build_networks()
    assert set(student) == set(teacher) == {"backbone", "dino_head"}  # no iBOT head even if separate_head
    assert not student["backbone"].mask_token.requires_grad  # never masked: not optimized


def test_batches_carry_no_masks():
    cfg = load_config("quickstart", ["method=dino"])
    method = build_method(cfg)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    samples = [(method.build_transform()(image), 0) for _ in range(4)]
    batch = method.build_collate(patch_size=cfg.model.patch_size)(samples, rng=random.Random(0))
    assert not batch["masks"].any() and batch["n_masked_patches"].item() == 0
    assert batch["local_crops"].shape[0] == 4 * cfg.crops.local_crops_number


def test_training_lowers_the_loss_against_a_fixed_teacher(runner, tmp_path):
    trained, _ = runner.assert_training_lowers_loss("dino", *runner.FIXED_TEACHER)
    assert {"loss", "loss/dino_global", "loss/dino_local"} <= set(trained[-1])
    assert "loss/ibot" not in trained[-1] and "loss/koleo" not in trained[-1]
    assert (tmp_path / "trained" / "export" / "teacher_backbone.pth").exists()
