#!/usr/bin/env python
"""Plot a run's ``metrics.jsonl``: loss terms, learning rate and kNN accuracy over steps.

    python tools/plot_metrics.py outputs/run                  # reads outputs/run/metrics.jsonl
    python tools/plot_metrics.py outputs/run/metrics.jsonl --output curves.png

Training rows look like ``{"step": 120, "loss/dino": 10.2, "lr": 0.0004, ...}``; evaluation rows
``{"type": "eval", "step": 1250, "knn/top1@20": 71.3}``; ``final_knn`` rows (``{"type": "final_knn",
"teacher": 71.2, "random_init": 30.5}``) are drawn as stars.
Lines that are not JSON (e.g. cut short by a crash) are skipped and counted. Without kNN rows the
kNN panel is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_PREFIX = "loss"
LR_KEYS = ("lr", "last_layer_lr")


def read_rows(path: Path):
    """(rows, number of unreadable lines)."""
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


def series(rows, keep):
    """{key: ([steps], [values])} for numeric keys selected by ``keep(key)``; nulls are skipped."""
    out = defaultdict(lambda: ([], []))
    for row in rows:
        for key, value in row.items():
            if keep(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key][0].append(row["step"])
                out[key][1].append(value)
    return dict(sorted(out.items()))


def plot_metrics(rows, output: Path, title: str = "") -> Path:
    train_rows = [r for r in rows if "type" not in r]
    eval_rows = [r for r in rows if r.get("type") == "eval"]
    final_rows = [r for r in rows if r.get("type") == "final_knn"]
    losses = series(train_rows, lambda k: k == LOSS_PREFIX or k.startswith(LOSS_PREFIX + "/"))
    lrs = series(train_rows, lambda k: k in LR_KEYS)
    knn = series(eval_rows, lambda k: k.startswith("knn/"))
    # final_knn rows carry the top-1 of the trained teacher and of a random init, e.g.
    # {"type": "final_knn", "step": 500, "teacher": 71.2, "random_init": 30.5}.
    final = series(final_rows, lambda k: k not in ("step", "time", "type"))
    if not losses and not lrs and not knn and not final:
        raise ValueError(f"no loss, lr or knn metrics found in {len(rows)} rows")

    panels = [("loss", losses, True), ("learning rate", lrs, False)]
    if knn or final:
        panels.append(("kNN accuracy (%)", knn, False))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, data, log_scale) in zip(axes[:, 0], panels):
        for key, (steps, values) in data.items():
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 20 else None, markersize=3)
        if name.startswith("kNN"):
            for key, (steps, values) in final.items():
                ax.scatter(steps, values, marker="*", s=80, label=f"final {key}")
        if log_scale and data and all(v > 0 for _, vs in data.values() for v in vs):
            ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if data or (name.startswith("kNN") and final):
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl or a run directory holding one")
    parser.add_argument("--output", default=None, help="PNG path (default: metrics.png beside the jsonl)")
    args = parser.parse_args(argv)
    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"metrics file not found: {path}")
    rows, bad = read_rows(path)
    if bad:
        print(f"skipped {bad} unreadable line(s) in {path}")
    output = Path(args.output) if args.output else path.with_name("metrics.png")
    try:
        plot_metrics(rows, output, title=str(path.parent.name))
    except ValueError as exc:
        raise SystemExit(f"{path}: {exc}")
    print(f"wrote {output} from {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
