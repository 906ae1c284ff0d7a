"""Per-step hyper-parameter schedules of DINOv2 training (lr, weight decay, teacher momentum and temperature).

Every value is a function of the optimizer step only, so a resumed run recomputes exactly the values the
uninterrupted run would have used, and stopping early (``train.max_steps``) leaves the curves unchanged: the
schedules are laid out over ``total_steps``, the *scheduled* length of the run.

With ``W`` warmup steps, ``T`` total steps and ``s`` the step:

    lr(s)            = base_lr * s / W                                   for s < W
                     = min_lr + (base_lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2   for W <= s < T
    wd(s)            = wd_end + (wd - wd_end) * (1 + cos(pi * s / T)) / 2
    momentum(s)      = m_end  + (m - m_end)   * (1 + cos(pi * s / T)) / 2
    teacher_temp(s)  = warmup_temp + (temp - warmup_temp) * s / W_temp   for s < W_temp, else temp
    last_layer_lr(s) = 0 for s < F (frozen prototypes), else lr(s)

and every schedule holds its value at ``T`` for ``s >= T``. ``shape="constant"`` gives DINOv3's schedules
instead: the same lr warm-up, then ``lr(s) = base_lr``; ``wd(s) = wd`` and ``momentum(s) = m`` throughout (the
temperature as above).

With Gram anchoring, ``gram_loss_weight(s)`` is DINOv3's ``linear_warmup_cosine_decay`` of the weight: ``start`` to
``peak`` linearly over ``W_g`` steps, a cosine from ``peak`` to ``end`` over ``C_g`` steps, then ``end`` (the cosine
here is evaluated at ``i / C_g``, ``i < C_g``, so it reaches ``end`` one step later than DINOv3's endpoint-inclusive
grid); or the constant ``gram.loss_weight``. The curve shapes come from fvcore's param
schedulers (``LinearParamScheduler``, ``CosineParamScheduler``, ``ConstantParamScheduler``); pieces are joined on
integer step boundaries here rather than with ``CompositeParamScheduler``, whose boundary test adds a 1e-6
tolerance to the progress fraction: beyond a million steps (DINOv3-length runs) that moves a boundary by a step,
e.g. the prototype layer would start training one step before ``freeze_last_layer_epochs`` ends.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from fvcore.common.param_scheduler import (
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)

__all__ = ["SCHEDULE_SHAPES", "Schedules", "build_schedules", "scale_lr", "warmup_cosine_constant"]

SCHEDULE_SHAPES = ("cosine", "constant")


class _StepSchedule:
    """fvcore schedulers laid end to end over integer step ranges, then a constant ``final_value``.

    ``pieces`` is a list of ``(n_steps, scheduler)``; piece ``i`` covers its own ``n_steps`` steps and is
    evaluated at the progress fraction within that range, in ``[0, 1)``.
    """

    def __init__(self, pieces: list[tuple[int, ParamScheduler]], final_value: float) -> None:
        pieces = [(n, sched) for n, sched in pieces if n > 0]  # a zero-length warmup is no warmup
        self._schedulers = [sched for _, sched in pieces]
        self._lengths = [n for n, _ in pieces]
        self._ends = []
        end = 0
        for n in self._lengths:
            end += n
            self._ends.append(end)
        self.final_value = float(final_value)

    def __call__(self, step: int) -> float:
        i = bisect.bisect_right(self._ends, step)
        if i == len(self._schedulers):
            return self.final_value
        start = self._ends[i] - self._lengths[i]
        return float(self._schedulers[i]((step - start) / self._lengths[i]))


def _epochs_to_steps(name: str, epochs: float, epoch_length: int) -> int:
    if epochs < 0 or not math.isfinite(epochs):
        raise ValueError(f"{name} must be a finite number >= 0, got {epochs!r}")
    return int(round(epochs * epoch_length))


@dataclass(frozen=True)
class Schedules:
    """All per-step schedules of a run; ``at(step)`` gives the values for one optimizer step."""

    total_steps: int
    lr: _StepSchedule
    wd: _StepSchedule
    momentum: _StepSchedule
    teacher_temp: _StepSchedule
    freeze_last_layer_steps: int
    gram_loss_weight: _StepSchedule | None = None  # with Gram anchoring (``gram.enabled``)

    def at(self, step: int) -> dict[str, float]:
        """Values for optimizer step ``step`` (0-based); steps past ``total_steps`` hold the final values."""
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        step = min(int(step), self.total_steps)
        lr = self.lr(step)
        values = {
            "lr": lr,
            "wd": self.wd(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
            "last_layer_lr": 0.0 if step < self.freeze_last_layer_steps else lr,
        }
        if self.gram_loss_weight is not None:
            values["gram_loss_weight"] = self.gram_loss_weight(step)
        return values


def warmup_cosine_constant(*, start: float, peak: float, end: float, warmup_steps: int, cosine_steps: int | None,
                           total_steps: int) -> _StepSchedule:
    """``start`` -> ``peak`` linearly over ``warmup_steps``, a cosine ``peak`` -> ``end`` over ``cosine_steps``
    (``None``: the rest of ``total_steps``), then ``end``."""
    if cosine_steps is None:
        cosine_steps = max(total_steps - warmup_steps, 0)
    if warmup_steps < 0 or cosine_steps < 0:
        raise ValueError(f"warm-up and cosine lengths must be >= 0, got {warmup_steps} and {cosine_steps}")
    return _StepSchedule(
        [(warmup_steps, LinearParamScheduler(start_value=start, end_value=peak)),
         (cosine_steps, CosineParamScheduler(start_value=peak, end_value=end))],
        final_value=end,
    )


def build_schedules(
    *,
    total_steps: int,
    epoch_length: int,
    base_lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    freeze_last_layer_epochs: float,
    shape: str = "cosine",
    gram_loss_weight: dict | float | None = None,
) -> Schedules:
    """Build DINOv2's schedules (``shape="cosine"``) or DINOv3's (``"constant"``) over ``total_steps`` optimizer
    steps of ``epoch_length`` steps per epoch.

    ``base_lr`` is the peak lr, already scaled for the batch size (see :func:`scale_lr`). Epoch counts may be
    fractional; they are converted to steps with ``round(epochs * epoch_length)``. ``gram_loss_weight``: a
    constant, or ``{start, peak, end, warmup_epochs, cosine_epochs}`` (see :func:`warmup_cosine_constant`).
    """
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"the schedule shape must be one of {SCHEDULE_SHAPES}, got {shape!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if epoch_length <= 0:
        raise ValueError(f"epoch_length must be > 0, got {epoch_length}")
    warmup_steps = _epochs_to_steps("warmup_epochs", warmup_epochs, epoch_length)
    temp_warmup_steps = _epochs_to_steps("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, epoch_length)
    freeze_steps = _epochs_to_steps("freeze_last_layer_epochs", freeze_last_layer_epochs, epoch_length)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_epochs={warmup_epochs} ({warmup_steps} steps) is longer than the scheduled run "
            f"({total_steps} steps)"
        )
    if not 0.0 <= momentum_teacher <= 1.0 or not 0.0 <= final_momentum_teacher <= 1.0:
        raise ValueError(
            f"teacher momentum must lie in [0, 1], got momentum_teacher={momentum_teacher}, "
            f"final_momentum_teacher={final_momentum_teacher}"
        )
    if teacher_temp <= 0 or warmup_teacher_temp <= 0:
        raise ValueError(
            f"teacher temperatures must be > 0, got teacher_temp={teacher_temp}, "
            f"warmup_teacher_temp={warmup_teacher_temp}"
        )

    if shape == "constant":  # DINOv3: nothing decays after the lr warm-up
        min_lr, weight_decay_end, final_momentum_teacher = base_lr, weight_decay, momentum_teacher
    lr = _StepSchedule(
        [
            (warmup_steps, LinearParamScheduler(start_value=0.0, end_value=base_lr)),
            (total_steps - warmup_steps, CosineParamScheduler(start_value=base_lr, end_value=min_lr)),
        ],
        final_value=min_lr,
    )
    wd = _StepSchedule(
        [(total_steps, CosineParamScheduler(start_value=weight_decay, end_value=weight_decay_end))],
        final_value=weight_decay_end,
    )
    momentum = _StepSchedule(
        [(total_steps, CosineParamScheduler(start_value=momentum_teacher, end_value=final_momentum_teacher))],
        final_value=final_momentum_teacher,
    )
    # The temperature warmup has its own length: when it outlasts a short schedule, the run simply ends
    # part-way up the ramp (the value at total_steps is then held).
    temp = _StepSchedule(
        [
            (temp_warmup_steps, LinearParamScheduler(start_value=warmup_teacher_temp, end_value=teacher_temp)),
            (max(total_steps - temp_warmup_steps, 0), ConstantParamScheduler(teacher_temp)),
        ],
        final_value=teacher_temp,
    )
    gram = None
    if isinstance(gram_loss_weight, (int, float)):
        gram = _StepSchedule([], final_value=float(gram_loss_weight))
    elif gram_loss_weight is not None:
        w = gram_loss_weight
        gram = warmup_cosine_constant(
            start=w["start"], peak=w["peak"], end=w["end"],
            warmup_steps=_epochs_to_steps("gram loss weight warmup_epochs", w["warmup_epochs"], epoch_length),
            cosine_steps=_epochs_to_steps("gram loss weight cosine_epochs", w["cosine_epochs"], epoch_length),
            total_steps=total_steps,
        )
    return Schedules(
        total_steps=int(total_steps),
        lr=lr,
        wd=wd,
        momentum=momentum,
        teacher_temp=temp,
        freeze_last_layer_steps=freeze_steps,
        gram_loss_weight=gram,
    )


def scale_lr(base_lr: float, global_batch_size: int) -> float:
    """DINOv2's square-root rule: ``base_lr * sqrt(global_batch_size / 1024)``."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    return base_lr * math.sqrt(global_batch_size / 1024)
