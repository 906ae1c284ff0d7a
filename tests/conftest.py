"""Fixtures shared across test modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Test packages of many tiny models: they run single-threaded (see single_torch_thread).
SINGLE_THREAD_PACKAGES = frozenset({"eval", "export", "hub", "methods", "viz"})


@pytest.fixture(autouse=True)
def single_torch_thread(request):
    """One OpenMP thread for the tests in ``SINGLE_THREAD_PACKAGES``: the CI/dev machine is small and shared, and
    OpenMP threads spinning against other processes make tiny ops many times slower (4x for tests/hub)."""
    if Path(request.path).relative_to(TESTS).parts[0] not in SINGLE_THREAD_PACKAGES:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
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
    """A SLURM cluster that is already up; the tests never install or start one (that edits the machine)."""
    problem = _cluster_problem()
    if problem is not None:
        pytest.skip(f"SLURM is not usable ({problem}); start the dev cluster with: "
                    f"bash {START_SCRIPT.relative_to(REPO)}")
