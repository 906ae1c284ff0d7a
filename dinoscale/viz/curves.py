"""Curves of a run's ``metrics.jsonl``: reading its rows, picking numeric series, drawing them on axes.

Training rows look like ``{"step": 120, "loss/dino": 10.2, "lr": 0.0004, ...}``; event rows carry a ``"type"``:
``{"type": "eval", "step": 1250, "knn/top1@20": 71.3}``, ``{"type": "final_knn", "step": 500, "teacher": 71.2,
"random_init": 30.5}``, ``{"type": "skipped_step", "step": 17, "loss": null, ...}`` (see
``dinoscale.train.metrics``). ``tools/plot_metrics.py`` and ``dinoscale.report`` draw from here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

LOSS_PREFIX = "loss"
LR_KEYS = ("lr", "last_layer_lr")

Series = Dict[str, Tuple[List[float], List[float]]]  # key -> (steps, values)


def read_rows(path: str | Path) -> Tuple[List[dict], int]:
    """(rows with a numeric ``step``, number of unreadable lines, e.g. one cut short by a crash)."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def rows_of_type(rows: Sequence[dict], kind: str | None) -> List[dict]:
    """Training rows (``kind=None``: no ``type`` field) or the event rows of one type."""
    if kind is None:
        return [r for r in rows if "type" not in r]
    return [r for r in rows if r.get("type") == kind]


def series(rows: Sequence[dict], keep: Callable[[str], bool]) -> Series:
    """{key: ([steps], [values])} for numeric keys selected by ``keep(key)``; nulls are skipped."""
    out: Dict[str, Tuple[List[float], List[float]]] = defaultdict(lambda: ([], []))
    for row in rows:
        for key, value in row.items():
            if keep(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key][0].append(row["step"])
                out[key][1].append(value)
    return dict(sorted(out.items()))


def is_loss_key(key: str) -> bool:
    return key == LOSS_PREFIX or key.startswith(LOSS_PREFIX + "/")


def knn_series(rows: Sequence[dict]) -> Tuple[Series, Series]:
    """(kNN accuracies of the periodic ``eval`` rows, the ``final_knn`` rows' teacher / random_init top-1)."""
    knn = series(rows_of_type(rows, "eval"), lambda k: k.startswith("knn/"))
    final = series(rows_of_type(rows, "final_knn"), lambda k: k not in ("step", "time", "type"))
    return knn, final


def _draw_lines(ax, data: Series, scale: float = 1.0) -> None:
    for key, (steps, values) in data.items():
        ax.plot(steps, [v * scale for v in values], label=key, marker="o" if len(steps) < 20 else None,
                markersize=3)


def _finish_axes(ax, ylabel: str, has_data: bool) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def plot_series(ax, data: Series, *, ylabel: str, log_scale: bool = False, scale: float = 1.0) -> None:
    """One line per key (markers when there are few points), a legend, or "no data" when ``data`` is empty.
    ``log_scale`` applies only when every value is positive; ``scale`` multiplies the values (e.g. 100 for %)."""
    _draw_lines(ax, data, scale)
    if log_scale and data and all(v > 0 for _, vs in data.values() for v in vs):
        ax.set_yscale("log")
    _finish_axes(ax, ylabel, bool(data))


def plot_knn(ax, knn: Series, final: Series) -> None:
    """Periodic kNN accuracies as lines, the final teacher / random-init top-1 as stars."""
    _draw_lines(ax, knn)
    for key, (steps, values) in final.items():
        ax.scatter(steps, values, marker="*", s=80, label=f"final {key}")
    _finish_axes(ax, "kNN accuracy (%)", bool(knn or final))


def plot_metrics(rows: Sequence[dict], output: Path, title: str = "") -> Path:
    """Loss terms, learning rate and (when logged) kNN accuracy over steps, stacked in one PNG."""
    train_rows = rows_of_type(rows, None)
    losses = series(train_rows, is_loss_key)
    lrs = series(train_rows, lambda k: k in LR_KEYS)
    knn, final = knn_series(rows)
    if not losses and not lrs and not knn and not final:
        raise ValueError(f"no loss, lr or knn metrics found in {len(rows)} rows")

    n_panels = 3 if knn or final else 2
    fig, axes = plt.subplots(n_panels, 1, figsize=(8, 3 * n_panels), sharex=True, squeeze=False)
    plot_series(axes[0, 0], losses, ylabel="loss", log_scale=True)
    plot_series(axes[1, 0], lrs, ylabel="learning rate")
    if n_panels == 3:
        plot_knn(axes[2, 0], knn, final)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
