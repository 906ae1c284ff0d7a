"""``train_step`` alone on a tiny DINOv2 (CPU, no data files): a good step updates the student, the teacher by the
EMA and the loss centers; a non-finite step leaves all of them, and the optimizer state, exactly as they were."""

import math
from types import SimpleNamespace

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.train.build import build_networks, optimizer_from_config, schedules_from_config
from dinoscale.train.perf.flops import example_batch
from dinoscale.train.metrics import MetricLogger, read_metrics
from dinoscale.train.step import SkippedStepReview, StepResult, TooManyBadSteps, train_step
from tests.tiny import TINY_NETWORK

TINY = [
    *TINY_NETWORK,
    "train.official_epoch_length=4", "optim.epochs=5", "optim.warmup_epochs=1", "optim.scale_lr_with_batch=false",
    "optim.freeze_last_layer_epochs=0", "train.device=cpu",
]


@pytest.fixture
def tiny():
    cfg = load_config("quickstart", TINY)
    method, student, teacher = build_networks(cfg, torch.device("cpu"))
    student.train()
    teacher.eval()
    return SimpleNamespace(
        cfg=cfg, method=method, student=student, teacher=teacher,
        optimizer=optimizer_from_config(cfg, student),
        batch=example_batch(method, cfg.model.patch_size, 4, image_size=32),
        sched=schedules_from_config(cfg, global_batch=4).at(4),  # past the warmup: a non-zero lr
    )


def step(t, batch, bad_run: float = 0.0) -> StepResult:
    return train_step(t.method, t.student, t.teacher, t.optimizer, batch, t.sched, torch.tensor(bad_run),
                      clip_grad=t.cfg.optim.clip_grad)


def snapshot(t) -> dict[str, torch.Tensor]:
    """Every tensor a step may change: student, teacher, loss centers and optimizer state, by name."""
    state = {f"student.{k}": v.clone() for k, v in t.student.state_dict().items()}
    state |= {f"teacher.{k}": v.clone() for k, v in t.teacher.state_dict().items()}
    state |= {f"method.{k}": v.clone() for k, v in t.method.named_buffers()}
    names = {p: n for n, p in t.student.named_parameters()}
    for p, s in t.optimizer.state.items():
        state |= {f"optimizer.{names[p]}.{k}": v.clone() for k, v in s.items()}
    return state


def changed(before: dict, after: dict, prefix: str) -> list[str]:
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


def test_a_good_step_updates_the_student_the_teacher_by_the_ema_and_the_centers(tiny):
    before = snapshot(tiny)
    out = step(tiny, tiny.batch, bad_run=2.0)
    after = snapshot(tiny)

    assert not out.skipped and out.bad_run.item() == 0.0  # a good step ends a run of bad ones
    assert math.isfinite(out.loss.item()) and math.isfinite(out.grad_norm.item())
    assert set(out.terms) == {"dino_global", "dino_local", "koleo", "ibot"}
    student_params = [f"student.{n}" for n, _ in tiny.student.named_parameters()]
    assert set(changed(before, after, "student.")) >= {"student.backbone.patch_embed.proj.weight",
                                                       "student.dino_head.last_layer.weight_v"}
    assert len(changed(before, after, "student.")) > 0.9 * len(student_params)
    assert len([k for k in after if k.startswith("optimizer.")]) > 0  # the step created the moments

    momentum = tiny.sched["momentum"]
    for name, _ in tiny.teacher.named_parameters():
        t0, s1, t1 = before[f"teacher.{name}"], after[f"student.{name}"], after[f"teacher.{name}"]
        torch.testing.assert_close(t1, momentum * t0 + (1 - momentum) * s1, rtol=1e-5, atol=1e-7)
    assert changed(before, after, "teacher.backbone.patch_embed")
    assert changed(before, after, "method.") == ["method.dino_loss.center", "method.ibot_loss.center"]


def test_a_nonfinite_step_changes_nothing_and_counts_the_bad_run(tiny):
    step(tiny, tiny.batch)  # a good step first, so that the optimizer has moments and a step count to keep
    before = snapshot(tiny)
    poisoned = dict(tiny.batch, global_crops=tiny.batch["global_crops"].clone())
    poisoned["global_crops"][0, 0, 0, 0] = float("nan")
    out = step(tiny, poisoned, bad_run=1.0)
    after = snapshot(tiny)

    assert out.skipped and out.bad_run.item() == 2.0
    assert not math.isfinite(out.loss.item())
    assert set(before) == set(after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []

    # the skip holds for that step only: the next good step updates again and ends the run
    out = step(tiny, tiny.batch, bad_run=out.bad_run.item())
    assert not out.skipped and out.bad_run.item() == 0.0
    assert changed(after, snapshot(tiny), "student.backbone.patch_embed")


def result(skipped: bool, bad_run: int) -> StepResult:
    value = torch.tensor(float("nan") if skipped else 1.0)
    return StepResult(loss=value, terms={}, grad_norm=value.clone(), skipped=torch.tensor(skipped),
                      bad_run=torch.tensor(float(bad_run)))


def test_review_logs_each_skipped_step_once_and_stops_after_too_many(tmp_path):
    metrics = MetricLogger(tmp_path, total_steps=10, log_every=5, tensorboard=False, progress_bar=False)
    review = SkippedStepReview(metrics, max_in_a_row=3, bad_steps=0, checkpoint_dir=tmp_path / "checkpoints")
    for s, (skipped, run) in enumerate([(False, 0), (True, 1), (True, 2)], start=1):
        review.add(s, result(skipped, run))
    review.review()
    review.review()  # nothing new since: no second row
    assert review.bad_steps == 2  # what the next checkpoint saves
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("type") == "skipped_step"]
    assert [(r["step"], r["consecutive_bad_steps"], r["loss"]) for r in events] == [(2, 1, None), (3, 2, None)]

    review.add(4, result(True, 3))
    with pytest.raises(TooManyBadSteps, match=r"3 consecutive steps .*up to step 4.*checkpoints"):
        review.review()
    metrics.close()


def test_review_of_good_steps_resets_the_count(tmp_path):
    metrics = MetricLogger(tmp_path, total_steps=10, tensorboard=False, enabled=False)
    review = SkippedStepReview(metrics, max_in_a_row=3, bad_steps=2, checkpoint_dir=tmp_path)  # resumed mid-run
    review.add(7, result(False, 0))
    review.review()
    assert review.bad_steps == 0
