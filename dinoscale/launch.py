"""The submitit entry point: ``TrainingJob(config_path, overrides)`` runs one training task.

``tools/submit.py`` pickles a ``TrainingJob`` and submitit runs it once per task (one per GPU, or
``--tasks-per-node`` CPU tasks) on SLURM or through its ``LocalExecutor``. Each task:

1. turns submitit's view of the job (global rank, number of tasks, local rank, node list) into the
   torchrun-style variables ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` and
   calls :func:`dinoscale.distributed.init_distributed`, so submitit, torchrun and plain ``srun`` all
   end up in the same code path;
2. loads the config (``%j`` in ``train.output_dir`` becomes the job id, which SLURM keeps across
   requeues, so a requeued job finds its own checkpoints);
3. replaces submitit's signal handlers with one that only records the signal, and runs
   :func:`dinoscale.train.loop.train` with ``stop_requested`` reading it.

The signals that stop a run (:data:`dinoscale.lifecycle.STOP_SIGNALS`) and what they mean here:

* USR2 (``submitit.JobEnvironment.USR_SIG``: ``#SBATCH --signal=USR2@<--signal-delay>`` before the time
  limit) and USR1: a checkpoint-and-requeue notice.
* SIGTERM: SLURM's preemption. With a ``GraceTime``, SLURM sends SIGCONT and SIGTERM to every task of
  every step of the job (not to the batch shell) while the job is still RUNNING, and SIGKILL when the
  grace time is over. submitit itself only logs a SIGTERM ("Bypassing signal SIGTERM"), so a preempted
  job would run on until it is killed, and never requeue. Here it checkpoints and requeues like USR2.
  SLURM also sends SIGTERM when the job *ends*: ``scancel``, the time limit, a requeue by SLURM itself;
  then the job is no longer RUNNING (it is COMPLETING) when the signal arrives. Requeueing then would
  bring back a job its owner cancelled (``scontrol requeue`` accepts a completing job), so after a
  SIGTERM the job is requeued only while SLURM still reports it RUNNING (:func:`slurm_job_state`).

Why not let submitit's handler do the work: submitit calls ``checkpoint()``, requeues and
``sys.exit``\\ s *inside the signal handler*, i.e. in the middle of whatever step rank 0 is running,
while the other ranks carry on. Here the handler only records the signal; the training loop makes
all ranks agree at the next step boundary (a log step), saves a checkpoint and returns
``"preempted"``. Only then does rank 0 call submitit's handler for its signal, synchronously, which
calls :meth:`TrainingJob.checkpoint`, pickles the returned :class:`submitit.helpers.DelayedSubmission`,
runs ``scontrol requeue`` and exits. The requeued job builds a fresh process group and the loop
auto-resumes from the checkpoint. The whole hand-off must fit in ``--signal-delay`` (time-out) or
the cluster's ``GraceTime`` (preemption): ``train.log_every`` steps plus one checkpoint.

Failures are never requeued: an exception propagates, submitit records it as the job's result and
the job ends FAILED. Requeueing happens only on a stop signal, and at most ``max_requeues`` times
(submitit additionally caps time-outs with ``max_num_timeout``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Any, Sequence

import submitit

from dinoscale import lifecycle

log = logging.getLogger("dinoscale.launch")

DEFAULT_MAX_REQUEUES = 20


def export_torch_distributed_env(env: submitit.JobEnvironment) -> dict[str, str]:
    """Set the torchrun-style variables from submitit's job environment; returns what was set.

    ``MASTER_ADDR`` is the first host of the job (rank 0 runs there: SLURM and submitit's local
    executor both give the lowest ranks to the first node). Values already present in the
    environment for ``MASTER_ADDR``/``MASTER_PORT`` are kept, so a cluster that needs a specific
    interface or port can export them in the job's setup. The port is
    :func:`dinoscale.distributed.master_port_for_job`, the rule a plain ``srun`` launch uses too.
    """
    # Imported on the task, like the trainer in TrainingJob.__call__: tools/submit.py imports this
    # module on the submitting host, which needs neither torch nor the trainer.
    from dinoscale import distributed

    tasks_per_node = max(1, env.num_tasks // max(1, env.num_nodes))
    values = {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(tasks_per_node),
        "GROUP_RANK": str(env.node),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or env.hostnames[0],
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(distributed.master_port_for_job(env.job_id)),
    }
    os.environ.update(values)
    return values


def requeue_signal() -> signal.Signals:
    """submitit's checkpoint-and-requeue signal: USR2, or ``$SUBMITIT_PREEMPT_SIGNAL``."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of the job (``RUNNING``, ``COMPLETING``, ...); None when ``scontrol`` cannot tell."""
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bJobState=(\S+)", proc.stdout)
    return match.group(1) if proc.returncode == 0 and match else None


def should_requeue(signum: int | None, env: submitit.JobEnvironment) -> bool:
    """Whether a run stopped by ``signum`` requeues its job.

    A requeue notice (USR1/USR2), or a stop this rank did not receive itself, always does. A SIGTERM
    under SLURM does only while the job is still RUNNING (preemption's grace time): SLURM also sends
    SIGTERM when the job ends (scancel, time limit, a requeue of its own), and requeueing then would
    bring back a cancelled job. Unknown state: requeue (``scontrol requeue`` fails too if SLURM is gone).
    """
    if signum != signal.SIGTERM or env.name() != "slurm":
        return True
    state = slurm_job_state(env.job_id)
    if state not in (None, "RUNNING"):
        log.warning("not requeueing: SIGTERM while SLURM reports job %s as %s (cancelled, timed out or "
                    "requeued by SLURM), not as RUNNING (preemption)", env.job_id, state)
        return False
    return True


def _node_name() -> str:
    # SLURMD_NODENAME tells apart several slurmd on one host (the dev cluster); hostname otherwise.
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _configure_logging(rank: int) -> None:
    # Only the "dinoscale" logger: the root logger would print submitit's own messages twice.
    logger = logging.getLogger("dinoscale")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


class TrainingJob:
    """Picklable submitit callable running :func:`dinoscale.train.loop.train` on one task.

    Args:
        config_path: YAML config merged onto ``configs/default.yaml`` (None: the defaults only).
        overrides: ``key=value`` config overrides; ``%j`` in ``train.output_dir`` is replaced by the
            job id at run time.
        max_requeues: give up (end the job without requeueing) after this many preemptions/time-outs.
        requeue_count: how many times this job has been requeued already (set by :meth:`checkpoint`).
    """

    def __init__(
        self,
        config_path: str | None,
        overrides: Sequence[str] = (),
        max_requeues: int = DEFAULT_MAX_REQUEUES,
        requeue_count: int = 0,
    ) -> None:
        if max_requeues < 0:
            raise ValueError(f"max_requeues must be >= 0, got {max_requeues}")
        self.config_path = config_path
        self.overrides = list(overrides)
        self.max_requeues = max_requeues
        self.requeue_count = requeue_count

    def __repr__(self) -> str:
        return (f"TrainingJob(config_path={self.config_path!r}, overrides={self.overrides!r}, "
                f"requeue_count={self.requeue_count}/{self.max_requeues})")

    def __call__(self):
        # On the task only (see export_torch_distributed_env).
        from dinoscale import distributed
        from dinoscale.config import load_config

        env = submitit.JobEnvironment()
        _configure_logging(env.global_rank)
        # Install the flag first: a signal that arrives while the data and model are being built is
        # honoured at the first step boundary. submitit's own handlers are kept to requeue with.
        stop = lifecycle.StopRequest()
        submitit_handlers = {signum: stop.install(signum)
                             for signum in dict.fromkeys((*lifecycle.STOP_SIGNALS, requeue_signal()))}

        cfg = load_config(self.config_path, self.overrides)
        cfg.train.output_dir = str(cfg.train.output_dir).replace("%j", env.job_id)

        if env.num_tasks > 1:  # one task stays a plain single process (no process group)
            export_torch_distributed_env(env)
        info = distributed.init_distributed()
        log.info("job %s (requeued %d times), output_dir %s", env.job_id, self.requeue_count, cfg.train.output_dir)
        # Every rank prints its placement (the loggers of ranks > 0 are quiet), so the job's logs
        # show which node each rank ran on.
        print(
            f"[dinoscale.launch] rank {info.rank} of world size {info.world_size} (local rank {info.local_rank}) "
            f"on node {_node_name()}, master {info.master_addr}:{info.master_port}, pid {os.getpid()}",
            flush=True,
        )

        from dinoscale.train.loop import train

        try:
            result = train(cfg, stop_requested=stop)
        except BaseException as exc:  # submitit records it as the job's result; the process must still exit
            lifecycle.teardown(exc)
            raise
        finally:
            distributed.destroy_distributed()

        if result.status != "preempted":
            return result
        log.warning("training stopped at step %d for preemption/time-out", result.step)
        if env.global_rank != 0:
            # Rank 0 requeues the whole job. Leave without a result file (SystemExit is not recorded
            # by submitit) and with status 0, so that `srun --kill-on-bad-exit` does not tear rank 0
            # down before it has requeued.
            sys.exit(0)
        if not should_requeue(stop.signum, env):
            return result
        # submitit's handler of its requeue signal (SignalHandler.checkpoint_and_try_requeue): decides
        # time-out vs preemption, calls self.checkpoint(), pickles it, `scontrol requeue`s and exits.
        # It raises UncompletedJobError (recorded as the job's result) when it will not requeue.
        submitit_requeue = submitit_handlers[requeue_signal()]
        if callable(submitit_requeue):
            submitit_requeue(stop.signum or requeue_signal(), None)
        # Only reached when submitit had no handler installed (not a submitit job environment).
        raise RuntimeError(
            f"training was preempted at step {result.step} but no submitit signal handler was installed "
            "to requeue the job; run TrainingJob through submitit (tools/submit.py)"
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit (on rank 0) to build the requeued job; None refuses the requeue.

        The model state is not in here: the training loop has already written a checkpoint to
        ``train.output_dir`` and the requeued job auto-resumes from it.
        """
        if self.requeue_count >= self.max_requeues:
            log.error("not requeueing: the job was already requeued %d times (max_requeues=%d)",
                      self.requeue_count, self.max_requeues)
            return None
        log.warning("requeueing (%d of at most %d)", self.requeue_count + 1, self.max_requeues)
        return submitit.helpers.DelayedSubmission(
            TrainingJob(self.config_path, self.overrides, max_requeues=self.max_requeues,
                        requeue_count=self.requeue_count + 1)
        )
