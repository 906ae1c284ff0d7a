"""One training step, and the host's review of the steps that were skipped.

A step whose loss or gradient is not finite on any rank is skipped on the device, without a host sync: the
fused AdamW skips on the device (``step_unless_``), the EMA momentum becomes 1 (the teacher stays), the loss
centers are restored, and the count of consecutive skipped steps goes up. The host reads these flags only at
log and checkpoint steps (:class:`SkippedStepReview`), so a step never waits for the device.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dinoscale import distributed
from dinoscale.data.transforms.photometric import photometric_collated
from dinoscale.methods.base import student_units
from dinoscale.train.metrics import MetricLogger
from dinoscale.train.optim import apply_schedule_, clip_grad_norm_, set_trainable_, step_unless_
from dinoscale.train.teacher import ema_update_

log = logging.getLogger("dinoscale")


class TooManyBadSteps(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class StepResult:
    """What one step leaves for logging; every tensor stays on the device."""

    loss: torch.Tensor  # this rank's loss (its local batch mean), detached
    terms: dict[str, torch.Tensor]  # the loss's named parts, as the method returns them
    grad_norm: torch.Tensor  # the student's gradient norm before clipping
    skipped: torch.Tensor  # 0-dim bool: the loss or gradient was not finite on some rank, nothing was updated
    bad_run: torch.Tensor  # 0-dim float: consecutive skipped steps up to this one (0 after a good step)


def device_batch(batch: dict[str, Any], device: torch.device, *, photometric_seed: int | None = None
                 ) -> dict[str, Any]:
    """``batch``'s tensors on ``device``; with a seed, colour jitter, blur and solarize applied there as
    batched ops (``crops.photometric_on_device``)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if photometric_seed is not None:
        batch = photometric_collated(batch, torch.Generator(device).manual_seed(photometric_seed))
    return batch


def train_step(
    method: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: dict[str, float],
    bad_run: torch.Tensor,
    *,
    clip_grad: float | None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    backbone_frozen: bool = False,
) -> StepResult:
    """One optimizer step of ``student`` (and EMA step of ``teacher``) on ``batch`` with the schedule values
    ``sched``, skipped on the device when the loss or gradient is not finite on any rank.

    ``bad_run`` is the count of consecutive skipped steps before this one (a 0-dim tensor on the device); the
    result holds the count after it. No host sync unless the optimizer is not fused (see ``step_unless_``).
    With ``backbone_frozen`` (a continued run's heads-only warm-up) the student's backbone gets no gradient and no
    update; the EMA then leaves the teacher's backbone as it is, equal to the student's when it started so (as
    every run does).
    """
    apply_schedule_(optimizer, lr=sched["lr"], wd=sched["wd"], last_layer_lr=sched["last_layer_lr"])
    set_trainable_(optimizer, student["backbone"], not backbone_frozen)
    centers = {k: v.clone() for k, v in method.named_buffers()}  # restored if the step is skipped

    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss, terms = method(student, teacher, batch, sched)
    loss.backward()
    # Each student clipped on its own (distillation may train several): one student's gradient never scales
    # another's. The logged norm is that of all of them together.
    norms = [clip_grad_norm_(unit.parameters(), clip_grad) for unit in student_units(student).values()]
    grad_norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()

    nonfinite = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float().reshape(1)
    skip = (distributed.all_reduce_sum_(nonfinite) > 0).reshape(())
    step_unless_(optimizer, skip)
    if teacher is not None:
        ema_update_(teacher, student, torch.where(skip, 1.0, sched["momentum"]))
    buffers = dict(method.named_buffers())
    for name, saved in centers.items():
        buffers[name].copy_(torch.where(skip, saved, buffers[name]))
    return StepResult(loss=loss.detach(), terms=terms, grad_norm=grad_norm, skipped=skip,
                      bad_run=torch.where(skip, bad_run + 1, 0.0))


class SkippedStepReview:
    """The host's view of skipped steps: collects each step's device-side flags, and on :meth:`review` (at log
    and checkpoint steps) reads them in one transfer, logs every skipped step and stops the run after
    ``max_in_a_row`` consecutive ones.

    ``bad_steps`` is the count of consecutive skipped steps up to the last reviewed step: what a checkpoint
    saves, so that a resumed run goes on counting.
    """

    def __init__(self, metrics: MetricLogger, *, max_in_a_row: int, bad_steps: int, checkpoint_dir: Path) -> None:
        self.metrics = metrics
        self.max_in_a_row = max_in_a_row
        self.bad_steps = bad_steps
        self.checkpoint_dir = checkpoint_dir  # where the last good checkpoint is, for the error message
        self._unreviewed: list[tuple[int, torch.Tensor]] = []  # (step, [skipped, loss, grad_norm, bad_run])

    def add(self, step: int, result: StepResult) -> None:
        """Keep the flags of the step that brought the count to ``step`` (no host sync)."""
        self._unreviewed.append((step, torch.stack([result.skipped.float(), result.loss.float(),
                                                    result.grad_norm.detach().float(), result.bad_run])))

    def review(self) -> None:
        """Log the skipped steps since the last review; raise :class:`TooManyBadSteps` after too many in a row."""
        if not self._unreviewed:
            return
        steps = [s for s, _ in self._unreviewed]
        values = torch.stack([v for _, v in self._unreviewed]).tolist()
        self._unreviewed.clear()
        for step, (skipped, loss, grad_norm, run) in zip(steps, values):
            if skipped:
                self.metrics.log_event(step, {"type": "skipped_step", "loss": loss, "grad_norm": grad_norm,
                                              "consecutive_bad_steps": int(run)})
                log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", step, int(run))
            if run >= self.max_in_a_row:
                raise TooManyBadSteps(
                    f"{int(run)} consecutive steps with a non-finite loss or gradient (up to step {step}); "
                    "stopping. Lower optim.base_lr, raise optim.warmup_epochs, or check the data. The last good "
                    f"checkpoint is in {self.checkpoint_dir}."
                )
        self.bad_steps = int(values[-1][3])
