"""The report in a real browser: headless Chromium renders it, and the screenshot shows the charts."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoscale.report import write_report
from dinoscale.report.screenshot import INSTALL_HINT, crop_to_content, find_chromium, render_page, screenshot_full_page

REPO = Path(__file__).resolve().parents[2]
MPL_BLUE, MPL_ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours (C0, C1)
PAGE_BACKGROUND = (0xF4, 0xF5, 0xF7)

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason=f"needs headless Chromium: {INSTALL_HINT}")


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def count_near(image, colour, tolerance=12):
    return int((np.abs(image - np.array(colour)).max(axis=-1) <= tolerance).sum())


@needs_chromium
def test_chromium_renders_the_report_with_its_charts(tiny_run, tmp_path):
    page = write_report(tiny_run, tmp_path / "report.html")
    png = render_page(page, tmp_path / "top.png", width=1280, height=2400)
    image = pixels(png)
    assert image.shape == (2400, 1280, 3)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # not a blank page
    # The loss and schedule charts are drawn: their line colours cover many pixels, and so does the page.
    assert count_near(image, MPL_BLUE) > 500 and count_near(image, MPL_ORANGE) > 100
    assert count_near(image, PAGE_BACKGROUND, tolerance=0) > 100_000

    full = screenshot_full_page(page, tmp_path / "full.png", width=1280)
    image = pixels(full)
    assert image.shape[1] == 1280 and 2400 < image.shape[0] < 16000
    assert (image[-10:] == image[-1, 0]).all() and not (image[-60:-24] == image[-1, 0]).all()  # cropped at the end


@needs_chromium
def test_screenshot_tool_writes_a_small_png(run_copy, tmp_path):
    spec = importlib.util.spec_from_file_location("screenshot_tool", REPO / "tools" / "screenshot_report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "shot.png"
    assert tool.main([str(run_copy), "--refresh", "--output", str(out), "--resize-width", "640", "--colors", "64"]) == 0
    with Image.open(out) as im:
        assert im.width == 640 and im.mode == "P" and len(im.getcolors()) <= 64
    assert (run_copy / "report.html").is_file()
    assert tool.main([str(tmp_path / "nothing")]) == 2


def test_crop_to_content_removes_the_plain_bottom(tmp_path):
    image = np.full((300, 100, 3), 240, dtype=np.uint8)
    image[20:150, 10:90] = (31, 119, 180)
    Image.fromarray(image).save(tmp_path / "page.png")
    cropped = crop_to_content(tmp_path / "page.png", margin=10)
    assert cropped.size == (100, 160)
    assert np.array_equal(np.asarray(cropped), image[:160])
