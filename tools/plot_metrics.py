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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinoscale.viz.curves import plot_metrics, read_rows  # noqa: E402


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
