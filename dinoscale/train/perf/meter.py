"""Achieved FLOP/s and model FLOPs utilisation (MFU) of a training run, over a window of steps.

Usage in a training loop (count before FSDP wraps the networks; :func:`throughput_meter` does both look-ups
and returns None if the step cannot be traced)::

    flops = step_flops(method, student, teacher, example_batch(method, patch_size, batch_size, device=device))
    peak, source = peak_flops(device, torch.bfloat16)
    meter = ThroughputMeter(flops, peak, window=log_every)
    ...
    meter.update()                  # after every optimizer step
    stats = meter.stats()           # {"tflops_per_s": ..., "mfu": ...} over the last log_every steps
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Mapping

import torch
from torch import nn

from dinoscale.train.perf.flops import step_flops
from dinoscale.train.perf.peak import peak_flops

__all__ = ["ThroughputMeter", "throughput_meter"]

log = logging.getLogger("dinoscale")


class ThroughputMeter:
    """Achieved FLOP/s and MFU over the last ``window`` optimizer steps.

    ``flops_per_step``: from :func:`step_flops` (this rank). ``peak_flops_per_s``: from :func:`peak_flops` (one
    device). ``mfu = flops_per_step * steps / seconds / peak_flops_per_s``. Time is host wall time between
    :meth:`update` calls; in a loop with one host sync per step it tracks the device. Nothing is read from the
    device. With ``window = log_every`` the figures cover the same steps as the logger's images/s.
    """

    def __init__(self, flops_per_step: float, peak_flops_per_s: float, *, window: int = 10) -> None:
        if not flops_per_step > 0:
            raise ValueError(f"flops_per_step must be > 0, got {flops_per_step}")
        if not peak_flops_per_s > 0:
            raise ValueError(f"peak_flops_per_s must be > 0, got {peak_flops_per_s}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.flops_per_step = float(flops_per_step)
        self.peak_flops_per_s = float(peak_flops_per_s)
        self._warned_above_peak = False
        # Times of the last window + 1 step ends; the first entry is the meter's creation.
        self._times: deque[float] = deque([time.perf_counter()], maxlen=window + 1)

    def restart(self) -> None:
        """Forget the window: time from now on (e.g. when the loop starts, or after a checkpoint or an evaluation,
        whose time is not training's)."""
        self._times = deque([time.perf_counter()], maxlen=self._times.maxlen)

    def update(self) -> None:
        """Mark the end of one optimizer step."""
        self._times.append(time.perf_counter())

    def stats(self) -> dict[str, float]:
        """``{"tflops_per_s", "mfu"}`` over the steps in the window (zeros before the first step)."""
        steps = len(self._times) - 1
        elapsed = self._times[-1] - self._times[0]
        if steps == 0 or elapsed <= 0:
            return {"tflops_per_s": 0.0, "mfu": 0.0}
        achieved = self.flops_per_step * steps / elapsed
        mfu = achieved / self.peak_flops_per_s
        if mfu > 1.0 and not self._warned_above_peak:
            self._warned_above_peak = True
            log.warning("mfu %.2f is above 1: the peak %.4g FLOP/s is too low (measured on a busy machine?); it is "
                        "probed again at the next start and the best figure kept", mfu, self.peak_flops_per_s)
        return {"tflops_per_s": achieved / 1e12, "mfu": mfu}


def throughput_meter(
    method: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    batch: Mapping[str, Any],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    window: int = 10,
) -> ThroughputMeter | None:
    """:class:`ThroughputMeter` for a run: counts the step (:func:`step_flops`, on unsharded networks) and looks up
    the peak (:func:`peak_flops`). Returns None, with a warning, when either fails: a metric must not stop a run.
    """
    try:
        flops = step_flops(method, student, teacher, batch)
        # CPUs are probed at every start (milliseconds): the cache keeps the best figure, so a probe taken on a
        # busy machine once does not stay the denominator for good.
        peak, source = peak_flops(device, dtype, refresh=torch.device(device).type == "cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        log.warning("no tflops_per_s / mfu in the logs: %s", exc)
        return None
    log.info("FLOPs per step and rank: %.4g; peak: %.4g FLOP/s (%s)", flops, peak, source)
    return ThroughputMeter(flops, peak, window=window)
