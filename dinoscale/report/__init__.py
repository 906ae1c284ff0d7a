"""One self-contained HTML page about a training run (``tools/report.py RUN_DIR`` -> ``RUN_DIR/report.html``).

``run.py`` reads the run directory (config, metrics rows, checkpoints, export, status), ``figures.py`` draws the
charts and pictures as inline PNGs, ``page.py`` assembles the page, ``screenshot.py`` renders a page to PNG
with headless Chromium.
"""

from dinoscale.report.page import REPORT_NAME, render_report, write_report
from dinoscale.report.run import NotARunError, RunSummary, read_run

__all__ = ["NotARunError", "REPORT_NAME", "RunSummary", "read_run", "render_report", "write_report"]
