"""An image folder whose every file is unreadable: the run ends at once, naming the folder."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.chaos

STARTUP_S = 300  # start-up, model and loader: generous, the machine may be loaded
EXIT_BOUND_S = 20  # from the error's traceback to the end of the process


def test_unreadable_image_folder_ends_the_run_promptly(tmp_path, train_run):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"not an image")
    # A loader worker: the hang was multiprocessing's exit handler waiting for it.
    run = train_run(tmp_path / "out", [f"train.dataset={images}", "train.num_workers=1", "train.max_steps=4"])
    failed = run.wait_for("Traceback (most recent call last)", STARTUP_S)
    rc, ended = run.wait_exit(EXIT_BOUND_S)
    print(f"exited {ended - failed:.1f} s after the error (bound {EXIT_BOUND_S} s)")
    assert rc == 1, run.text()[-4000:]
    assert f"training failed: RuntimeError: none of the 3 image files under {images} could be read" in run.text()
