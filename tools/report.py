#!/usr/bin/env python
"""Write one self-contained HTML report of a training run: RUN_DIR/report.html.

    python tools/report.py outputs/quickstart
    python tools/report.py outputs/run --output /tmp/run.html --no-pictures

Summary (status, steps, wall time, final kNN teacher vs random init, the exported teacher), loss terms,
schedules, kNN over time, throughput, skipped steps and data problems, attention maps and patch-feature PCA of
the trained network on a few images of the run's dataset, and the resolved config. Works on a partial run
(sections not written yet say so); exits with status 2 for a directory that is not a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinoscale.report import NotARunError, write_report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training output directory (train.output_dir)")
    parser.add_argument("--output", default=None, help="HTML path (default: RUN_DIR/report.html)")
    parser.add_argument("--no-pictures", dest="pictures", action="store_false",
                        help="leave out the attention / PCA pictures (no network is loaded)")
    parser.add_argument("--images", type=int, default=6, help="images in the attention / PCA pictures")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.output, pictures=args.pictures, n_images=args.images)
    except NotARunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
