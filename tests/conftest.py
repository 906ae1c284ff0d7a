"""Fixtures shared across test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO / "slurm" / "dev-cluster" / "start.sh"


def _cluster_problem() -> str | None:
    """None when SLURM answers with >= 2 usable nodes, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "sinfo/sbatch not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer within 20 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    # Exact states only: a suffix such as "idle*" means the node does not respond.
    usable = {line.split()[0] for line in proc.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1] in ("idle", "mix", "alloc", "comp")}
    if len(usable) < 2:
        return f"fewer than 2 usable nodes:\n{proc.stdout}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = _cluster_problem()
    if problem is None:
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM is not usable ({problem}) and only root can run {START_SCRIPT.relative_to(REPO)}")
    try:
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"SLURM is not usable ({problem}) and start.sh did not finish within 900 s")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        pytest.skip(f"SLURM is not usable ({problem}) and start.sh could not install/start it:\n{tail}")
    problem = _cluster_problem()
    if problem is not None:
        pytest.skip(f"start.sh ran but SLURM is still not usable: {problem}")
