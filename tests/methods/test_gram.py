"""The Gram teacher of DINOv3's Gram anchoring (``dinoscale.methods.gram``) in the DINOv2 method and the loop:
when it is copied from the EMA teacher, the exact resume across the stage boundary and across its refreshes, the
checkpoint's refusal when a Gram stage starts after a checkpoint without one, the loss-weight schedule; the
higher-resolution Gram crops and a multi-resolution stage (DINOv3's high-resolution adaptation)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from dinoscale import checkpoint
from dinoscale.config import CONFIG_DIR, load_config
from dinoscale.methods import gram as gram_module
from dinoscale.methods.gram import GramAnchor, resize_patch_features
from dinoscale.methods.registry import build_method
from dinoscale.methods.views import crop_resolutions
from dinoscale.train import loop
from dinoscale.train.build import planned_steps, schedules_from_config
from dinoscale.train.teacher import init_teacher_from_student_
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


def test_gram_crops_feed_the_gram_teacher_at_their_size(monkeypatch):
    """With ``crops.gram_crops_size``, the Gram teacher sees ``batch["gram_crops"]`` (a 2x larger patch grid),
    resized to the student's grid before the loss."""
    cfg = config("gram.enabled=true", "gram.it_load_ema_teacher=0", "crops.gram_crops_size=32")
    method = build_method(cfg)
    student, teacher = method.build_networks()
    init_teacher_from_student_(teacher, student)
    student.eval()  # no drop path: the two forwards below differ in the Gram teacher's input only
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=g)
    transform, collate = method.build_transform(), method.build_collate(cfg.model.patch_size)
    torch.manual_seed(0)
    batch = collate([(transform(image), 0) for image in images], rng=random.Random(0))
    assert batch["global_crops"].shape == (6, 3, 16, 16) and batch["gram_crops"].shape == (6, 3, 32, 32)

    calls = []
    resize = gram_module.resize_patch_features

    def recording_resize(patches, grid, size, **kw):
        calls.append((tuple(patches.shape), grid, size))
        return resize(patches, grid, size, **kw)

    monkeypatch.setattr(gram_module, "resize_patch_features", recording_resize)
    method.before_step(0, teacher)  # the Gram teacher <- the EMA teacher
    sched = {"teacher_temp": 0.04, "gram_loss_weight": 1.0}
    _, terms = method(student, teacher, batch, sched)
    assert calls == [((6, 64, 32), (8, 8), (4, 4))]  # 32 px / 4 px patches: an 8x8 grid, resized to 16 / 4
    _, plain = method(student, teacher, {k: v for k, v in batch.items() if k != "gram_crops"}, sched)
    assert calls[1] == ((6, 16, 32), (4, 4), (4, 4))  # without them: the global crops, the student's grid
    assert terms["gram"] > 0 and plain["gram"] > 0 and terms["gram"] != plain["gram"]


MULTI_RES = ["gram.enabled=true", "gram.it_load_ema_teacher=0", "crops.multi_resolution.enabled=true",
             "crops.multi_resolution.global_crops_sizes=[16,24]", "crops.multi_resolution.local_crops_sizes=[8,12]",
             "crops.multi_resolution.gram_crops_sizes=[32,48]", "crops.multi_resolution.weights=[1,1]"]


@needs_fmnist
def test_a_multi_resolution_stage_with_gram_crops_trains_and_resumes_exactly(tmp_path):
    """DINOv3's high-resolution adaptation in small: two (global, local, Gram) sizes drawn per step; the seed is
    one whose steps 0 and 1 draw different sizes. A run resumed after its first step repeats the second."""
    resolutions = crop_resolutions(config(*MULTI_RES).crops)
    seed = next(s for s in range(100) if resolutions.at_step(0, s) != resolutions.at_step(1, s))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    loop.train(config(*MULTI_RES, f"train.seed={seed}", "train.max_steps=2", f"train.output_dir={full}"))
    loop.train(config(*MULTI_RES, f"train.seed={seed}", "train.max_steps=1", f"train.output_dir={resumed}"))
    loop.train(config(*MULTI_RES, f"train.seed={seed}", "train.max_steps=2", f"train.output_dir={resumed}"))
    a, b = rows(full), rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        assert math.isfinite(a[step]["loss"]) and a[step]["loss/gram"] > 0, step
    for key in ("loss", "loss/dino_global", "loss/ibot", "loss/gram", "grad_norm"):
        assert a[2][key] == b[2][key], key


def test_the_high_resolution_stage_continues_the_gram_stage():
    """configs/train/dinov3_vits16_highres.yaml resumes the Gram stage's last checkpoint with its networks, global
    batch and Gram teacher (which no step of the stage copies again), and its crop table fits the patch size."""
    gram_stage = load_config(CONFIG_DIR / "train" / "dinov3_vits16_gram.yaml")
    highres = load_config(CONFIG_DIR / "train" / "dinov3_vits16_highres.yaml")
    start, end = planned_steps(gram_stage), planned_steps(highres)
    assert (start, end) == (1_200_000, 1_230_000)
    for section in ("model", "dino", "ibot"):
        assert highres[section] == gram_stage[section], section
    assert highres.train.batch_size_per_rank == gram_stage.train.batch_size_per_rank
    anchor = GramAnchor(highres)
    assert anchor.holds_weights_after(start) and all(s < start for s in anchor.refresh_steps(end))
    resolutions = crop_resolutions(highres.crops)
    assert set(resolutions.global_sizes) == {512, 768} and all(g % 16 == 0 for g in resolutions.gram_sizes)
    method = build_method(highres)
    method.build_transform()
    method.build_collate(highres.model.patch_size)  # every global size is a multiple of the patch size
