"""A PNG of an HTML page, rendered by headless Chromium (``apt-get install -y chromium`` on Debian).

Chromium's ``--screenshot`` captures one window of ``--window-size``. For the full page the window is made
``max_height`` tall and the plain background below the page's end is cropped off.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install -y chromium"


class ChromiumError(RuntimeError):
    """Chromium is missing, failed, or wrote no screenshot."""


def find_chromium() -> Optional[str]:
    """The path of a Chromium (or Chrome) executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def render_page(html_path: str | Path, png_path: str | Path, *, width: int = 1280, height: int = 1024,
                timeout_s: float = 120.0) -> Path:
    """Screenshot of the first ``width`` x ``height`` pixels of the page (exactly that size)."""
    chromium = find_chromium()
    if chromium is None:
        raise ChromiumError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); install it: {INSTALL_HINT}")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="dinoscale-chromium-") as profile:  # no shared browser profile
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png_path}", f"--window-size={width},{height}",
               html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ChromiumError(f"Chromium did not finish within {timeout_s:g} s: {' '.join(cmd)}") from exc
    if proc.returncode != 0 or not png_path.is_file():
        raise ChromiumError(f"Chromium failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return png_path


def crop_to_content(png_path: str | Path, margin: int = 24) -> Image.Image:
    """The image without the rows at its bottom that are all the colour of its last row."""
    with Image.open(png_path) as im:
        image = im.convert("RGB")
    pixels = np.asarray(image)
    differs = np.any(pixels != pixels[-1:, :1, :], axis=(1, 2))  # rows not entirely the bottom-left colour
    last = int(np.nonzero(differs)[0][-1]) + 1 if differs.any() else 1
    return image.crop((0, 0, image.width, min(image.height, last + margin)))


def screenshot_full_page(html_path: str | Path, png_path: str | Path, *, width: int = 1280,
                         max_height: int = 16000, timeout_s: float = 120.0) -> Path:
    """Screenshot of the whole page (up to ``max_height`` pixels), ``width`` pixels wide."""
    png_path = Path(png_path)
    render_page(html_path, png_path, width=width, height=max_height, timeout_s=timeout_s)
    crop_to_content(png_path).save(png_path, optimize=True)
    return png_path
