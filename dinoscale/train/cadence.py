"""When the training loop logs, checkpoints, evaluates and stops, given the step just completed.

Steps count completed optimizer steps: ``step`` is 1 after the first one. ``max_steps`` is where the run ends.
"""

from __future__ import annotations

from typing import Callable

import torch

from dinoscale import distributed


def should_log(step: int, *, log_every: int, max_steps: int) -> bool:
    """Every ``log_every`` steps, and at the last step."""
    return step % log_every == 0 or step == max_steps


def should_checkpoint(step: int, *, checkpoint_every: int, max_steps: int) -> bool:
    """Every ``checkpoint_every`` steps, and at the last step."""
    return step % checkpoint_every == 0 or step == max_steps


def should_evaluate(step: int, *, period: int | None, max_steps: int) -> bool:
    """Every ``period`` steps (never when 0 or None), but not at the last step: the end has its own export."""
    return bool(period) and step % period == 0 and step < max_steps


def stop_agreed(stop_requested: Callable[[], bool] | None, *, log_step: bool, device: torch.device) -> bool:
    """Whether every process stops after this step.

    A stop request (SIGTERM/USR1/USR2) is a host flag: one process reads it every step; several processes agree
    on it at log steps only (one small all-reduce), so a stop waits at most ``train.log_every`` steps.
    """
    if stop_requested is None:
        return False
    if distributed.get_world_size() == 1:
        return bool(stop_requested())
    if not log_step:
        return False
    flag = torch.tensor([float(bool(stop_requested()))], device=device)
    return distributed.all_reduce_sum_(flag).item() > 0
