"""Training on a real SLURM cluster (two nodes): tools/submit.py (submitit) and slurm/train.sbatch.

Needs a SLURM cluster with at least two responding nodes (``slurm_cluster`` in tests/conftest.py skips
otherwise, naming the command that starts the dev cluster, slurm/dev-cluster/start.sh).

The time-out notices are sent the way SLURM sends them: USR2 to every task for the submitit job
(``#SBATCH --signal=USR2@90``), USR1 to the batch shell for the sbatch job (``--signal=B:USR1@90``). Both
must checkpoint, requeue and finish with exactly the losses of an uninterrupted run. Preemption's SIGTERM
is in tests/chaos/test_slurm_preemption.py. A requeued job is held a few minutes by SLURM (BeginTime); the tests
release it a few seconds after its old incarnation is gone (``wait_for_job``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
STEPS = 20
JOB_WAIT_S = 420

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "crops.local_crops_number=2", "train.batch_size_per_rank=8", "train.num_workers=0",
    "train.autocast=none", "train.tensorboard=false", "train.log_every=1", "evaluation.final_knn=false",
    # read the IDX files directly: building the quickstart's shards in every job's checkout costs a minute
    "train.dataset=fashion-mnist:train", "train.build_shards_from=null",
    "train.checkpoint_every=10",
]
RUNNING_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


# ---------------------------------------------------------------------------------------------
# a frozen copy of the code, cluster and job helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    """A snapshot of the code the jobs run. The runs compared here start minutes apart; running
    them from one snapshot keeps edits to the working tree in the meantime from making them differ."""
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dinoscale", "tools", "configs", "slurm"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    return root


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------


def job_info(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


# SLURM holds a requeued job (Reason=BeginTime) for the lifetime of its launch credential, two minutes and more:
# a credential issued in the same second as the revocation of the old one is refused (slurmd: "Job N already
# killed, do not launch batch job") and the job ends FAILED, and the old incarnation must be cleared out first.
# The tests release it sooner: once it has been held RELEASE_AFTER_S and no process of it is left on this host
# (the dev cluster's nodes). Releasing it at once failed a requeued job on a loaded machine.
RELEASE_AFTER_S = 3


def job_processes(job_id: str) -> list[int]:
    """Processes on this host that belong to the job (tasks, srun, batch shell: SLURM_JOB_ID in their environment)."""
    needle = f"\0SLURM_JOB_ID={job_id}\0".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in b"\0" + (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return pids


def wait_for_job(job_id: str, *, until=None, logs: list[Path] = (), timeout_s: float = JOB_WAIT_S) -> dict[str, str]:
    """Poll until ``until()`` is true (None: until the job ended); returns the last job info.

    A requeued job is released from SLURM's hold early (see RELEASE_AFTER_S) to keep tests short.
    """
    deadline = time.monotonic() + timeout_s
    info: dict[str, str] = {}
    held_since = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        state = info.get("JobState", "UNKNOWN")
        if until is not None and until():
            return info
        if until is None and info and state not in RUNNING_STATES:
            return info
        if until is not None and info and state not in RUNNING_STATES:
            pytest.fail(f"job {job_id} ended ({state}) before the awaited condition\n{_tails(logs)}")
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= RELEASE_AFTER_S and not job_processes(job_id):
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                               timeout=30)
        else:
            held_since = None
        time.sleep(1)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout_s} s (cancelled)\n{_tails(logs)}")


def _tails(paths) -> str:
    out = []
    for path in paths:
        path = Path(path)
        text = path.read_text(errors="replace") if path.exists() else "<missing>"
        out.append(f"---- {path}\n" + "\n".join(text.splitlines()[-30:]))
    return "\n".join(out)


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "type" not in r]


def submit(checkout: Path, output_dir: Path, *overrides: str) -> tuple[str, Path]:
    """tools/submit.py on two nodes, one CPU task each; returns (job id, submitit log dir)."""
    cmd = [sys.executable, str(checkout / "tools" / "submit.py"), "--nodes", "2", "--ngpus", "0", "--timeout", "20",
           "--job-name", "dinoscale-test", "--config", CONFIG, "--output-dir", str(output_dir),
           f"train.max_steps={STEPS}", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    job_id = match.group(1)
    log_dir = Path(re.search(r"stdout: (\S+)", proc.stdout).group(1)).parent
    assert f"output dir: {str(output_dir).replace('%j', job_id)}" in proc.stdout
    return job_id, log_dir


def task_logs(log_dir: Path, job_id: str) -> list[Path]:
    return [log_dir / f"{job_id}_{t}_log.{ext}" for t in (0, 1) for ext in ("out", "err")]


def task_results(log_dir: Path, job_id: str) -> list[tuple[str, object]]:
    return [pickle.loads((log_dir / f"{job_id}_{t}_result.pkl").read_bytes()) for t in (0, 1)]


def placement(log_text: str) -> tuple[int, int, str]:
    """(rank, world size, node) from the line dinoscale.launch prints on every rank."""
    m = re.search(r"\[dinoscale\.launch\] rank (\d+) of world size (\d+) .* on node (\S+),", log_text)
    assert m, log_text[-2000:]
    return int(m.group(1)), int(m.group(2)), m.group(3)


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), [r["step"] for r in got]
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in ("loss", "loss/dino_global", "loss/ibot", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def sbatch(checkout: Path, tmp_path: Path, *overrides: str) -> tuple[str, Path, Path]:
    """slurm/train.sbatch on two nodes, one CPU task each; returns (job id, its log, the run directory)."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, CONFIG=CONFIG, OUTPUT_DIR=str(run_dir), PYTHON=sys.executable,
               DINOSCALE_ROOT=str(checkout), PYTHONPATH=str(checkout))
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=20", "--job-name=dinoscale-sbatch-test", f"--output={tmp_path / 'sbatch-%j.out'}",
         str(checkout / "slurm" / "train.sbatch"), f"train.max_steps={STEPS}", *TINY, *overrides],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, tmp_path / f"sbatch-{job_id}.out", run_dir


def wait_for_rows(job_id: str, run_dir: Path, n: int, logs: list[Path]) -> None:
    wait_for_job(job_id, until=lambda: len(metrics_rows(run_dir)) >= n, logs=logs)
    assert len(metrics_rows(run_dir)) < STEPS, "the run finished before it could be preempted"


# ---------------------------------------------------------------------------------------------
# tools/submit.py (submitit)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, checkout, tmp_path_factory):
    """An uninterrupted 2-node run: checked by the first test, the yardstick of the others."""
    root = tmp_path_factory.mktemp("slurm_reference")
    job_id, log_dir = submit(checkout, root / "%j")
    info = wait_for_job(job_id, logs=task_logs(log_dir, job_id))
    return {"job_id": job_id, "log_dir": log_dir, "run_dir": root / job_id, "info": info}


def test_two_node_submitit_run_finishes_as_one_process_group(reference_run):
    job_id, log_dir, run_dir = reference_run["job_id"], reference_run["log_dir"], reference_run["run_dir"]
    logs = task_logs(log_dir, job_id)
    assert reference_run["info"]["JobState"] == "COMPLETED", _tails(logs)
    assert reference_run["info"]["NumNodes"] == "2"

    for outcome, result in task_results(log_dir, job_id):
        assert outcome == "success", result
        assert (result.status, result.step) == ("finished", STEPS)

    # One process group of two ranks, one rank on each node.
    ranks = [placement((log_dir / f"{job_id}_{t}_log.out").read_text()) for t in (0, 1)]
    assert [(r, w) for r, w, _ in ranks] == [(0, 2), (1, 2)]
    nodes = {node for _, _, node in ranks}
    assert len(nodes) == 2, ranks
    job_nodes = subprocess.run(["scontrol", "show", "hostnames", reference_run["info"]["NodeList"]],
                               capture_output=True, text=True, timeout=30).stdout.split()
    assert nodes == set(job_nodes), (nodes, job_nodes)

    # The run directory: %j expanded, metrics for every step, checkpoints, exported teacher.
    assert [r["step"] for r in metrics_rows(run_dir)] == list(range(1, STEPS + 1))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts and ckpts[-1].endswith(f"{STEPS:09d}"), ckpts
    assert (run_dir / "config.yaml").exists()
    assert f"output_dir: {run_dir}" in (run_dir / "config.yaml").read_text()


def test_submitit_time_out_notice_requeues_and_resumes_exactly(reference_run, checkout, tmp_path):
    job_id, log_dir = submit(checkout, tmp_path / "%j")
    run_dir = tmp_path / job_id
    logs = task_logs(log_dir, job_id)
    wait_for_rows(job_id, run_dir, 5, logs)
    # What `#SBATCH --signal=USR2@90` sends before the time limit: USR2 to every task.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    info = wait_for_job(job_id, logs=logs)
    assert info["JobState"] == "COMPLETED", _tails(logs)
    assert info["Restarts"] == "1", info
    out0 = (log_dir / f"{job_id}_0_log.out").read_text()
    assert "received SIGUSR2" in out0, _tails(logs)
    assert "requeueing (1 of at most" in out0 and "(requeued 1 times)" in out0, _tails(logs)
    stopped = int(re.search(r"training stopped at step (\d+) for preemption", out0).group(1))
    assert 5 <= stopped < STEPS
    for outcome, result in task_results(log_dir, job_id):
        assert outcome == "success", result
        assert (result.status, result.step) == ("finished", STEPS)
    assert_same_losses(metrics_rows(run_dir), metrics_rows(reference_run["run_dir"]))


def test_failing_job_is_not_requeued(slurm_cluster, checkout, tmp_path):
    job_id, log_dir = submit(checkout, tmp_path / "%j", f"train.dataset={tmp_path / 'no_such_dataset'}")
    info = wait_for_job(job_id, logs=task_logs(log_dir, job_id))
    assert info["JobState"] == "FAILED", info
    assert info["Restarts"] == "0", info
    outcome, trace = task_results(log_dir, job_id)[0]
    assert outcome == "error" and "no_such_dataset" in trace, trace


# ---------------------------------------------------------------------------------------------
# slurm/train.sbatch (no submitit)
# ---------------------------------------------------------------------------------------------


def test_sbatch_script_time_out_notice_requeues_and_resumes_exactly(reference_run, checkout, tmp_path):
    job_id, log, run_dir = sbatch(checkout, tmp_path)
    wait_for_rows(job_id, run_dir, 5, [log])
    # What `#SBATCH --signal=B:USR1@90` does before the time limit: USR1 to the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)

    info = wait_for_job(job_id, logs=[log])
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", _tails([log])
    assert info["Restarts"] == "1", info
    assert "received USR1" in text and f"requeueing job {job_id} (restart 1)" in text, _tails([log])
    assert f"job {job_id} (restart 1)" in text
    assert "training exited with status 0" in text, _tails([log])
    assert_same_losses(metrics_rows(run_dir), metrics_rows(reference_run["run_dir"]))


# ---------------------------------------------------------------------------------------------
# scancel: the SIGTERM that ends a job is not preemption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["submitit", "sbatch"])
def test_cancelled_job_is_not_requeued(slurm_cluster, checkout, tmp_path, launcher):
    """scancel sends SIGTERM to every task too, but the job is already CANCELLED (COMPLETING) then: it
    stays cancelled (`scontrol requeue` would accept it and bring it back)."""
    if launcher == "submitit":
        job_id, log_dir = submit(checkout, tmp_path / "%j")
        run_dir, logs = tmp_path / job_id, task_logs(log_dir, job_id)
    else:
        job_id, log, run_dir = sbatch(checkout, tmp_path)
        logs = [log]
    wait_for_rows(job_id, run_dir, 3, logs)
    subprocess.run(["scancel", job_id], check=True, timeout=30)

    info = wait_for_job(job_id, logs=logs)
    assert info["JobState"] == "CANCELLED", (info, _tails(logs))
    assert info["Restarts"] == "0", info
