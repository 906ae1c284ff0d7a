"""Training metrics: a console line (or a progress bar), ``metrics.jsonl`` and TensorBoard scalars.

The loop calls ``log(step, metrics, n_images)`` after every optimizer step, with ``step`` the number of steps
completed so far (1 after the first step, ``total_steps`` after the last). Only at log steps
(``step % log_every == 0`` and ``step == total_steps``) are the metric tensors read back to the host, so the other
steps never wait for the device. Each log step appends one JSON line to ``<output_dir>/metrics.jsonl``::

    {"step": 120, "loss/dino": 10.2, "lr": 0.0004, ..., "images_per_s": 531.7, "eta_s": 3605.2, "time": 1712345678.9}

Occasional events (evaluation results, skipped steps) go to the same file with :meth:`MetricLogger.log_event`, as
rows that carry a ``"type"`` field. Non-finite values are written as ``null`` so the file stays strict JSON.

The console gets one short line per log step (:func:`console_line`): the loss, the learning rate, the throughput and
the ETA, plus only what is abnormal; the file, TensorBoard and the trackers (``dinoscale.train.trackers``: W&B,
MLflow) get every metric.

On resume the file is appended to; rows with a step after the resume step (left by the interrupted run after its
last checkpoint) are dropped when the logger opens, so a step never has two rows.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dinoscale.train.cadence import should_log
from dinoscale.train.trackers import Tracker

log = logging.getLogger("dinoscale")

__all__ = ["MetricLogger", "console_line", "read_metrics"]

_RESERVED_KEYS = frozenset({"step", "images_per_s", "eta_s", "time", "type"})

# The metrics the console line always shows, as the training loop names them: the total loss and the learning rate.
LOSS_KEY = "loss"
LR_KEY = "lr"
# Counts that are zero in a healthy run; the console line shows them only when they are not. data/* are the
# loader's damage counts (corrupt samples, bad shards, padded samples).
_ABNORMAL_PREFIXES = ("data/",)
_ABNORMAL_KEYS = ("skipped_steps_in_a_row",)


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _to_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Metric values as floats; all tensors are read back in one transfer per device."""
    out: dict[str, float] = {}
    tensors: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric '{key}' must be a scalar, got a tensor of shape {tuple(value.shape)}")
            tensors.setdefault(value.device, []).append((key, value.detach().reshape(())))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            raise TypeError(f"metric '{key}' must be a number or a scalar tensor, got {type(value).__name__}")
    for items in tensors.values():
        stacked = torch.stack([t.to(torch.float64) for _, t in items]).cpu().tolist()
        out.update((key, v) for (key, _), v in zip(items, stacked))
    return {key: out[key] for key in values}  # the caller's order


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (unreadable lines, e.g. one cut short by a crash, are skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _is_abnormal_count(key: str) -> bool:
    return key in _ABNORMAL_KEYS or key.startswith(_ABNORMAL_PREFIXES)


def console_line(values: Mapping[str, float], images_per_s: float, eta_s: float) -> str:
    """The short text of a log step: ``loss 10.21 | lr 4.0e-04 | 531 img/s | eta 0:03:12``, then only what is
    abnormal: a non-zero damage or skip count (``data/corrupt_samples 3``) and the names of non-finite metrics.

    The caller puts ``step N/TOTAL | `` before it on a plain line (a progress bar shows the step itself)."""
    parts = []
    if LOSS_KEY in values:
        parts.append(f"loss {values[LOSS_KEY]:.4g}")
    if LR_KEY in values:
        parts.append(f"lr {values[LR_KEY]:.1e}")
    rate = f"{images_per_s:.0f}" if images_per_s >= 10 else f"{images_per_s:.2g}"  # 531, 4.2, 0.37
    parts += [f"{rate} img/s", f"eta {_format_duration(eta_s)}"]
    counts = [key for key, value in values.items() if _is_abnormal_count(key) and value != 0]
    parts += [f"{key} {values[key]:g}" for key in counts]
    shown = {LOSS_KEY, LR_KEY, *counts}
    nonfinite = [key for key, value in values.items() if not math.isfinite(value) and key not in shown]
    if nonfinite:
        parts.append("non-finite " + ", ".join(nonfinite))
    return " | ".join(parts)


class MetricLogger:
    """Logs training metrics every ``log_every`` steps; does nothing at all when ``enabled`` is False.

    Args:
        output_dir: run directory; ``metrics.jsonl`` and ``tensorboard/`` are written there.
        total_steps: the step at which this run ends (``max_steps`` when it stops early); always logged, and the
            basis of the ETA.
        log_every: log every this many steps.
        tensorboard: also write TensorBoard scalars (to ``output_dir/tensorboard``).
        enabled: False on non-zero ranks.
        start_step: the resume step, i.e. the steps completed by the checkpoint this run resumes from. Existing
            rows with ``step > start_step`` are dropped from ``metrics.jsonl`` (and later TensorBoard events are
            purged). 0 means a fresh run: an existing file from an earlier attempt is emptied.
        progress_bar: show a tqdm bar instead of plain lines; None: only when stdout is a terminal.
        trackers: experiment trackers (``dinoscale.train.trackers``) that get the scalars TensorBoard gets; the
            logger closes them with itself.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int,
        log_every: int = 10,
        tensorboard: bool = True,
        enabled: bool = True,
        start_step: int = 0,
        progress_bar: bool | None = None,
        trackers: Sequence[Tracker] = (),
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.enabled = enabled
        self.total_steps = int(total_steps)
        self.log_every = int(log_every)
        self.start_step = int(start_step)
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._writer = None
        self._bar = None
        self._trackers = list(trackers)
        if not enabled:
            return

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_for_resume()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._writer = SummaryWriter(
                log_dir=str(self.path.parent / "tensorboard"),
                # readers drop events from this step on, as the jsonl drops its rows
                purge_step=self.start_step + 1 if self.start_step > 0 else 0,
            )
        if progress_bar is None:
            progress_bar = sys.stdout.isatty()
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=self.start_step, file=sys.stdout, dynamic_ncols=True, unit="step"
            )
        # The throughput window: images seen and time since the last log step.
        self._window_images = 0
        self._window_start = time.perf_counter()
        self._last_logged_step = self.start_step

    # ------------------------------------------------------------------ resume
    def _truncate_for_resume(self) -> None:
        """Keep only rows up to the resume step; a crashed run may have logged steps past its checkpoint."""
        if not self.path.exists():
            return
        kept, dropped, unreadable = [], 0, 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    step = int(row["step"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    unreadable += 1
                    continue
                if self.start_step == 0 or step > self.start_step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped or unreadable:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)  # atomic: a crash here leaves either the old or the new file
            print(
                f"{self.path}: kept {len(kept)} rows up to step {self.start_step}, dropped {dropped} rows of an "
                f"earlier attempt and {unreadable} unreadable lines",
                flush=True,
            )

    # ------------------------------------------------------------------ logging
    def is_log_step(self, step: int) -> bool:
        return should_log(step, log_every=self.log_every, max_steps=self.total_steps)

    def log(self, step: int, metrics: Mapping[str, Any], n_images: int) -> None:
        """Record the optimizer step that brought the count to ``step`` and processed ``n_images`` images (pass the
        global count for global img/s)."""
        if not self.enabled:
            return
        self._window_images += n_images
        if not self.is_log_step(step):
            return
        for key in metrics:
            if key in _RESERVED_KEYS:
                raise ValueError(f"metric name '{key}' is reserved (reserved: {sorted(_RESERVED_KEYS)})")
        values = _to_floats(metrics)  # the only host sync of the step

        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        window_steps = max(step - self._last_logged_step, 1)
        images_per_s = self._window_images / elapsed
        eta_s = elapsed / window_steps * max(self.total_steps - step, 0)
        self._window_images = 0
        self._window_start = now
        self._last_logged_step = step

        row = {"step": int(step)}
        row.update((key, _json_value(v)) for key, v in values.items())
        row.update(images_per_s=images_per_s, eta_s=eta_s, time=time.time())
        self._write_row(row)
        if self._writer is not None:
            for key, v in values.items():
                self._writer.add_scalar(key, v, step)
            self._writer.add_scalar("perf/images_per_s", images_per_s, step)
        self._to_trackers(step, {**values, "perf/images_per_s": images_per_s})

        text = console_line(values, images_per_s, eta_s)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text)
        else:
            print(f"step {step}/{self.total_steps} | {text}", flush=True)

    def log_event(self, step: int, event: Mapping[str, Any]) -> None:
        """Write an occasional event row, e.g. ``{"type": "eval", "knn/top1@20": 71.3}`` (type defaults to
        ``"event"``). Values may be numbers, scalar tensors, strings, booleans or None."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step), "type": str(event.get("type", "event"))}
        numeric = {}
        for key, value in event.items():
            if key == "type":
                continue
            if key in ("step", "time"):
                raise ValueError(f"event key '{key}' is reserved")
            if isinstance(value, torch.Tensor) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                numeric[key] = value
            elif value is None or isinstance(value, (str, bool)):
                row[key] = value
            else:
                raise TypeError(
                    f"event value '{key}' must be a number, tensor, str, bool or None, got {type(value).__name__}"
                )
        floats = _to_floats(numeric)
        row.update((key, _json_value(v)) for key, v in floats.items())
        row["time"] = time.time()
        self._write_row(row)
        if self._writer is not None:
            for key, v in floats.items():
                self._writer.add_scalar(key, v, step)
        if floats:
            self._to_trackers(step, floats)
        message = " ".join(f"{k} {v}" for k, v in row.items() if k not in ("step", "type", "time"))
        text = f"step {step} [{row['type']}] {message}"
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    @staticmethod
    def append_jsonl(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
        """Append one row to a ``metrics.jsonl`` outside a logger's life (e.g. a final evaluation after
        :meth:`close`). Scalar tensors become floats and non-finite floats ``null``, as in logged rows."""
        out = {}
        for key, value in row.items():
            if isinstance(value, torch.Tensor):
                value = _to_floats({key: value})[key]
            out[key] = _json_value(value) if isinstance(value, float) else value
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(out, allow_nan=False) + "\n")

    def _to_trackers(self, step: int, values: Mapping[str, float]) -> None:
        """The scalars TensorBoard gets, to each tracker; one that fails is dropped (metrics.jsonl has it all)."""
        for tracker in list(self._trackers):
            try:
                tracker.log(step, values)
            except Exception as exc:  # noqa: BLE001 - a tracker's network or server trouble must not end the run
                log.warning("%s tracker failed at step %d (%s: %s); it gets no more metrics in this run",
                            tracker.name, step, type(exc).__name__, exc)
                self._trackers.remove(tracker)
                self._close_tracker(tracker)

    @staticmethod
    def _close_tracker(tracker: Tracker) -> None:
        try:
            tracker.close()
        except Exception as exc:  # noqa: BLE001 - closing the others and the files matters more
            log.warning("%s tracker failed to close (%s: %s)", tracker.name, type(exc).__name__, exc)

    def _write_row(self, row: dict) -> None:
        if self._file is None:
            raise RuntimeError(f"MetricLogger for {self.path} is closed")
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()  # a crash loses at most the line being written

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        while self._trackers:
            self._close_tracker(self._trackers.pop(0))

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
