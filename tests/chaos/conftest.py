"""Fault injection for tools/train.py: runs it as a subprocess on a tiny config and watches its log and exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.tiny import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

TINY = TINY_RUN  # a step takes a fraction of a second on one core: a run is mostly start-up


class TrainRun:
    """``tools/train.py`` in its own process group, its stdout and stderr in ``log``."""

    def __init__(self, output_dir: Path, overrides: list[str], env: dict[str, str] | None = None):
        self.output_dir = Path(output_dir)
        self.log = self.output_dir.with_name(self.output_dir.name + ".log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(REPO / "tools" / "train.py"), "--config", "configs/quickstart.yaml", *TINY,
                   f"train.output_dir={self.output_dir}", *overrides]
        with open(self.log, "w") as log:
            # A session of its own: signals go to the whole group (as timeout and SLURM send them), and the
            # fixture can end everything the test started.
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> float:
        """Wait until ``needle`` appears in the log; returns when (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return time.monotonic()
            if self.proc.poll() is not None and needle not in self.text():
                pytest.fail(f"tools/train.py ended (rc={self.proc.returncode}) without printing {needle!r}:\n"
                            f"{self.text()[-4000:]}")
            time.sleep(0.1)
        pytest.fail(f"{needle!r} did not appear within {timeout} s:\n{self.text()[-4000:]}")

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Wait for the process to end: (exit code, when). Fails the test if it is still running after ``timeout``."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tools/train.py still running {timeout} s later:\n{self.text()[-4000:]}")
        return rc, time.monotonic()

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """End the process group this run started (a hung run on unfixed code, or workers left behind)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def train_run():
    """``train_run(output_dir, overrides, env=None)`` starts tools/train.py; everything is killed afterwards."""
    runs: list[TrainRun] = []

    def start(output_dir, overrides=(), env=None) -> TrainRun:
        runs.append(TrainRun(output_dir, list(overrides), env))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


def run_to_end(output_dir: Path, overrides=(), timeout: float = 600) -> TrainRun:
    """Run tools/train.py to its end; fails unless it exits with 0."""
    run = TrainRun(output_dir, list(overrides))
    try:
        rc, _ = run.wait_exit(timeout)
    finally:
        run.kill()
    assert rc == 0, run.text()[-4000:]
    return run


def logged_losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {row["step"]: row["loss"] for row in rows if "type" not in row}


@pytest.fixture
def tmpfs(tmp_path):
    """A 12 MB tmpfs mounted for the test (needs root, as CI runs); skipped where mounting is not permitted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({proc.stderr.strip() or proc.returncode}); needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
