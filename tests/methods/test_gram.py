"""The Gram teacher of DINOv3's Gram anchoring (``dinoscale.methods.gram``) in the DINOv2 method and the loop:
when it is copied from the EMA teacher, the exact resume across the stage boundary and across its refreshes, the
checkpoint's refusal when a Gram stage starts after a checkpoint without one, the loss-weight schedule."""

import json
from pathlib import Path

import pytest
import torch

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.methods.gram import GramAnchor, resize_patch_features
from dinoscale.methods.registry import build_method
from dinoscale.train import loop
from dinoscale.train.build import schedules_from_config
from tests.tiny import TINY_RUN

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

TINY = [*TINY_RUN, "model.drop_path_rate=0.1", "optim.base_lr=0.001", "teacher.momentum_teacher=0.9",
        "teacher.final_momentum_teacher=0.9"]  # the EMA teacher moves every step: each copy is recognisable
GRAM = ["gram.enabled=true", "gram.it_load_ema_teacher=3", "gram.update_frequency=2", "gram.it_first_update=5",
        "gram.max_updates=1"]  # copies at the start of steps 3 (load) and 6 (the one refresh; 8 would be a second)


def config(*extra):
    return load_config("quickstart", TINY + list(extra))


def rows(out_dir):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in lines if "type" not in r}


def test_copy_steps_follow_the_config():
    gram = GramAnchor(config(*GRAM))
    assert [s for s in range(12) if gram.copies_at(s)] == [3, 6]
    assert not gram.holds_weights_after(3) and gram.holds_weights_after(4)
    # DINOv3's 7B Gram stage: loaded at 1M, refreshed every 10k from 1.01M, 3 times
    dinov3 = GramAnchor(config("gram.enabled=true", "gram.it_load_ema_teacher=1000000", "gram.update_frequency=10000",
                               "gram.it_first_update=1010000", "gram.max_updates=3"))
    assert dinov3.refresh_steps(2_000_000) == [1_010_000, 1_020_000, 1_030_000]
    once = GramAnchor(config("gram.enabled=true", "gram.it_load_ema_teacher=4", "gram.rep_update=false"))
    assert [s for s in range(100) if once.copies_at(s)] == [4]
    with pytest.raises(ValueError, match="img_level"):
        GramAnchor(config("gram.enabled=true", "gram.tokens_used=masked"))
    with pytest.raises(ValueError, match="EMA teacher"):
        build_method(config("gram.enabled=true", "method=simclr"))


def test_loss_weight_schedule_is_dinov3s():
    # DINOv3's 7B Gram stage, scaled down: weight 0 for 2 epochs, a cosine to 2 over 1 epoch, then 2
    cfg = config("gram.enabled=true", "gram.loss_weight_schedule.enabled=true", "gram.loss_weight_schedule.end=2.0",
                 "gram.loss_weight_schedule.warmup_epochs=2", "gram.loss_weight_schedule.cosine_epochs=1",
                 "optim.epochs=5")  # 4 steps per epoch
    sched = schedules_from_config(cfg, global_batch=8)
    weights = [sched.at(s)["gram_loss_weight"] for s in range(20)]
    assert weights[:8] == [0.0] * 8 and weights[12:] == [2.0] * 8
    assert weights[8:12] == pytest.approx([0.0, 2 * (1 - 0.5 ** 0.5) / 2, 1.0, 2 * (1 + 0.5 ** 0.5) / 2])
    constant = schedules_from_config(config("gram.enabled=true", "gram.loss_weight=0.5"), 8)
    assert constant.at(3)["gram_loss_weight"] == 0.5
    assert "gram_loss_weight" not in schedules_from_config(config(), 8).at(3)


def test_resize_to_the_student_grid():
    # a feature that is linear in the column index, on a 4x4 grid, averaged to 2x2 ("area"): pairs of columns
    grid = torch.arange(4.0).repeat(4, 1)  # (4, 4): value = column
    patches = grid.reshape(1, 16, 1)
    out = resize_patch_features(patches, (4, 4), (2, 2), mode="area", antialias=False)
    assert out.reshape(2, 2).tolist() == [[0.5, 2.5], [0.5, 2.5]]
    same = resize_patch_features(patches, (4, 4), (4, 4), mode="bicubic", antialias=False)
    assert same is patches


def gram_teacher(ckpt):
    state = checkpoint.read_dcp_checkpoint(ckpt)
    return state.get("networks", {}).get("gram_teacher"), state["teacher"]


@needs_fmnist
def test_copies_happen_at_the_configured_steps(tmp_path):
    loop.train(config(*GRAM, "train.max_steps=8", "train.checkpoint_every=1", "train.keep_checkpoints=20",
                      f"train.output_dir={tmp_path}"))
    ckpts = {int(p.name.split("_")[1]): p for p in checkpoint.list_checkpoints(tmp_path)}
    assert sorted(ckpts) == list(range(1, 9))
    teachers = {s: gram_teacher(p)[1] for s, p in ckpts.items()}  # the EMA teacher after s steps
    for s in (1, 2, 3):  # before the copy at the start of step 3 no checkpoint holds a Gram teacher
        assert gram_teacher(ckpts[s])[0] is None
        assert json.loads((ckpts[s] / "trainer.json").read_text())["networks"] == []
    for s in range(4, 9):  # after s steps: the copy made at the start of step 3 (s <= 6), then of step 6
        gram, _ = gram_teacher(ckpts[s])
        source = teachers[3 if s <= 6 else 6]
        assert all(torch.equal(gram[k], source[k]) for k in gram), s
        key = "backbone.blocks.0.attn.qkv.weight"
        assert not torch.equal(gram[key], teachers[s][key])  # the EMA teacher has moved on
    r = rows(tmp_path)
    assert [r[s]["loss/gram"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0] and all(r[s]["loss/gram"] > 0 for s in range(4, 9))


@needs_fmnist
def test_resume_across_the_stage_boundary_and_a_refresh_is_exact(tmp_path):
    full, staged = tmp_path / "full", tmp_path / "staged"
    loop.train(config(*GRAM, "train.max_steps=8", f"train.output_dir={full}"))
    # pretraining without Gram anchoring to step 2 (its checkpoint has no Gram teacher) ...
    loop.train(config("train.max_steps=2", f"train.output_dir={staged}"))
    # ... then a Gram stage resumed from it: to step 5 (a checkpoint holding the Gram teacher), and on to 8
    # (the refresh at step 6 happens after the resume)
    loop.train(config(*GRAM, "train.max_steps=5", f"train.output_dir={staged}"))
    loop.train(config(*GRAM, "train.max_steps=8", f"train.output_dir={staged}"))
    a, b = rows(full), rows(staged)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "loss/dino_global", "loss/ibot", "loss/koleo", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
        if step > 2:
            assert a[step]["loss/gram"] == b[step]["loss/gram"], step
    (g1, t1), (g2, t2) = (gram_teacher(checkpoint.latest_checkpoint(d)) for d in (full, staged))
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and all(torch.equal(t1[k], t2[k]) for k in t1)


@needs_fmnist
def test_a_gram_stage_after_a_checkpoint_without_its_teacher_is_refused(tmp_path):
    loop.train(config("train.max_steps=4", f"train.output_dir={tmp_path}"))
    with pytest.raises(checkpoint.CheckpointError, match="it_load_ema_teacher"):
        loop.train(config(*GRAM, "train.max_steps=6", f"train.output_dir={tmp_path}"))  # s0=3 < 4
