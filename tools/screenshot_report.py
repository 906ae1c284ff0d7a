#!/usr/bin/env python
"""Full-page PNG screenshot of a run's report.html, rendered by headless Chromium (apt-get install -y chromium).

    python tools/screenshot_report.py outputs/quickstart                      # -> outputs/quickstart/report.png
    python tools/screenshot_report.py /work/runs/quickstart --output docs/images/quickstart_report.png \\
        --resize-width 900 --colors 256                                       # the README picture

Writes the report first when RUN_DIR has none (or with --refresh). --resize-width and --colors shrink the PNG
(Lanczos resize, then an adaptive palette) for committing it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from PIL import Image  # noqa: E402

from dinoscale.report import REPORT_NAME, NotARunError, write_report  # noqa: E402
from dinoscale.report.screenshot import ChromiumError, screenshot_full_page  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training output directory (train.output_dir)")
    parser.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/report.png)")
    parser.add_argument("--refresh", action="store_true", help="rewrite report.html first")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    parser.add_argument("--resize-width", type=int, default=None, help="scale the screenshot to this width")
    parser.add_argument("--colors", type=int, default=None, help="save with an adaptive palette of this many colours")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    page = run_dir / REPORT_NAME
    try:
        if args.refresh or not page.is_file():
            write_report(run_dir)
        output = Path(args.output) if args.output else run_dir / "report.png"
        output.parent.mkdir(parents=True, exist_ok=True)
        screenshot_full_page(page, output, width=args.width)
    except (NotARunError, ChromiumError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.resize_width or args.colors:
        with Image.open(output) as im:
            image = im.convert("RGB")
        if args.resize_width and args.resize_width < image.width:
            height = round(image.height * args.resize_width / image.width)
            image = image.resize((args.resize_width, height), Image.Resampling.LANCZOS)
        if args.colors:
            image = image.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        image.save(output, optimize=True)
    with Image.open(output) as im:
        print(f"wrote {output} ({im.width}x{im.height}, {output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
