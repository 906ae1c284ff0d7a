"""A SLURM job preempted on the dev cluster: it checkpoints, requeues itself within the grace time, resumes and
ends with exactly the losses of an uninterrupted run; under submitit (tools/submit.py) and under
slurm/train.sbatch.

How SLURM preempts a job with a ``GraceTime`` (slurmctld's preempt.c, 22.05): ``job_signal(job, SIGCONT, 0)`` and
``job_signal(job, SIGTERM, 0)``; flags 0 become ``KILL_STEPS_ONLY``: every task of every step gets the signal,
the batch shell does not, and the job stays RUNNING until the grace time is over (then SIGKILL, and SLURM
requeues or cancels it by ``PreemptMode``). ``scancel --signal=CONT|TERM <jobid>`` (no ``--full``/``--batch``)
is the same request with the same flags, so the test sends exactly that: the dev cluster has no preemption
configured (``PreemptType=preempt/none``). Not ``scancel --full``: that also signals the batch step, whose srun
then kills the step at once ("forcing job termination"), which is not what preemption does.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.test_slurm import (  # noqa: F401  (checkout and reference_run are fixtures)
    STEPS, _tails, assert_same_losses, checkout, job_info, metrics_rows, reference_run, sbatch, submit, task_logs,
    task_results, wait_for_job, wait_for_rows,
)

pytestmark = [pytest.mark.slurm, pytest.mark.chaos]

# From SIGTERM to the job back in the queue: the dev cluster's KillWait (real GraceTimes are minutes). This run
# needs one tiny step (train.log_every=1), a ~1 MB checkpoint and `scontrol requeue`: about 3 s. On code that does not handle SIGTERM the job is never
# requeued: it runs to its end (submitit only logs the SIGTERM; train.sbatch exited without requeueing).
GRACE_S = 30


def preempt(job_id: str) -> float:
    """Send what slurmctld sends at the start of a preemption's grace time; returns when (time.monotonic())."""
    sent = time.monotonic()
    for sig in ("CONT", "TERM"):
        subprocess.run(["scancel", f"--signal={sig}", job_id], check=True, timeout=30)
    return sent


def wait_for_requeue(job_id: str, sent: float, logs) -> float:
    """Seconds from ``sent`` until SLURM counts one restart of the job; fails the test past GRACE_S."""
    deadline = sent + GRACE_S
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("Restarts") == "1":
            return time.monotonic() - sent
        # SIGNALING: scancel's signals are still being delivered (seen at 15:41 today, 0.5 s after the TERM)
        if info and info.get("JobState") not in ("RUNNING", "SIGNALING", "COMPLETING", "PENDING", "REQUEUED"):
            pytest.fail(f"job {job_id} ended {info.get('JobState')} without requeueing\n{_tails(logs)}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not requeued within {GRACE_S} s of SIGTERM: {job_info(job_id)}\n{_tails(logs)}")


def test_submitit_job_preempted_by_sigterm_requeues_and_resumes_exactly(reference_run, checkout, tmp_path):
    job_id, log_dir = submit(checkout, tmp_path / "%j")
    run_dir, logs = tmp_path / job_id, task_logs(log_dir, job_id)
    wait_for_rows(job_id, run_dir, 5, logs)
    sent = preempt(job_id)
    requeued_s = wait_for_requeue(job_id, sent, logs)
    print(f"requeued {requeued_s:.1f} s after SIGTERM (bound {GRACE_S} s)")

    info = wait_for_job(job_id, logs=logs)
    assert info["JobState"] == "COMPLETED", _tails(logs)
    assert info["Restarts"] == "1", info
    out0 = (log_dir / f"{job_id}_0_log.out").read_text()
    first, resumed = out0.split("(requeued 1 times)", 1)
    assert "received SIGTERM" in first and "requeueing (1 of at most" in first, _tails(logs)
    stopped = int(re.search(r"checkpoint saved at step (\d+)", first).group(1))
    assert 5 <= stopped < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:09d}'} at step {stopped}" in resumed, out0
    for outcome, result in task_results(log_dir, job_id):
        assert outcome == "success", result
        assert (result.status, result.step) == ("finished", STEPS)
    assert_same_losses(metrics_rows(run_dir), metrics_rows(reference_run["run_dir"]))


def test_sbatch_job_preempted_by_sigterm_requeues_and_resumes_exactly(reference_run, checkout, tmp_path):
    job_id, log, run_dir = sbatch(checkout, tmp_path)
    wait_for_rows(job_id, run_dir, 5, [log])
    sent = preempt(job_id)
    requeued_s = wait_for_requeue(job_id, sent, [log])
    print(f"requeued {requeued_s:.1f} s after SIGTERM (bound {GRACE_S} s)")

    info = wait_for_job(job_id, logs=[log])
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", _tails([log])
    assert info["Restarts"] == "1", info
    first, resumed = text.split(f"[train.sbatch] job {job_id} (restart 1)", 1)
    assert "received SIGTERM" in first and f"requeueing job {job_id} (restart 1)" in first, _tails([log])
    stopped = int(re.search(r"checkpoint saved at step (\d+)", first).group(1))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:09d}'} at step {stopped}" in resumed, text
    assert "training exited with status 0" in resumed, _tails([log])
    assert_same_losses(metrics_rows(run_dir), metrics_rows(reference_run["run_dir"]))
