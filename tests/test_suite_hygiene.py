"""The test suite leaves the machine alone: without a running SLURM cluster the slurm tests skip, naming the
command that starts one, instead of installing and starting it (apt-get, /etc/hosts, daemons)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_slurm_tests_skip_with_the_start_command_when_no_cluster_is_up(tmp_path):
    # A PATH with python alone: no sinfo, no bash, no apt-get. The old fixture ran start.sh as root here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bin_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_slurm.py",
         "-k", "failing_job_is_not_requeued"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 skipped" in out, out
    assert "bash slurm/dev-cluster/start.sh" in out, out
