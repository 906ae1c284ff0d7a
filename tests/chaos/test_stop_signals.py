"""SIGTERM to a run stuck in a data read: it ends within the stop timeout; a second SIGTERM ends it at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.chaos

STARTUP_S = 300
STOP_TIMEOUT_S = 5  # DINOSCALE_STOP_TIMEOUT for these runs
TEARDOWN_S = 15  # from the stop timeout to the end of the process
SECOND_SIGNAL_BOUND_S = 5


def stuck_folder(tmp_path):
    """An image folder whose only file is a FIFO nobody writes to: opening it blocks, like a hung network mount."""
    folder = tmp_path / "stuck"
    folder.mkdir()
    os.mkfifo(folder / "0.png")
    return folder


def start_stuck(tmp_path, train_run, num_workers, stop_timeout_s):
    run = train_run(tmp_path / "out", [f"train.dataset={stuck_folder(tmp_path)}", f"train.num_workers={num_workers}",
                                       "train.max_steps=4"], env={"DINOSCALE_STOP_TIMEOUT": str(stop_timeout_s)})
    run.wait_for("starting a new run", STARTUP_S)
    time.sleep(2)  # the first batch is being read: the data read blocks
    return run


def test_sigterm_ends_a_stuck_run_within_the_stop_timeout(tmp_path, train_run):
    run = start_stuck(tmp_path, train_run, num_workers=1, stop_timeout_s=STOP_TIMEOUT_S)
    sent = time.monotonic()
    run.signal_group(signal.SIGTERM)  # as timeout(1) and SLURM send it: to the loader worker too
    rc, ended = run.wait_exit(STOP_TIMEOUT_S + TEARDOWN_S)
    print(f"ended {ended - sent:.1f} s after SIGTERM (bound {STOP_TIMEOUT_S + TEARDOWN_S} s)")
    assert rc == 128 + signal.SIGTERM, run.text()[-4000:]
    assert "did not reach a step boundary" in run.text()
    assert ended - sent >= STOP_TIMEOUT_S - 0.5  # it waited for a step boundary first


def test_second_sigterm_ends_a_stuck_run_at_once(tmp_path, train_run):
    run = start_stuck(tmp_path, train_run, num_workers=0, stop_timeout_s=600)  # the main process itself blocks
    run.signal_group(signal.SIGTERM)
    run.wait_for("will checkpoint and stop", 30)
    sent = time.monotonic()
    run.signal_group(signal.SIGTERM)
    rc, ended = run.wait_exit(SECOND_SIGNAL_BOUND_S)
    print(f"ended {ended - sent:.1f} s after the second SIGTERM (bound {SECOND_SIGNAL_BOUND_S} s)")
    assert rc == 128 + signal.SIGTERM and "exiting at once" in run.text(), run.text()[-4000:]
