"""A run's checkpoints as the loop writes and reads them: the networks, optimizer and loss state
(``dinoscale.checkpoint``), each rank's RNG streams, and the trainer state beside them (the count of consecutive
skipped steps, the data position and the global batch it was counted in).
"""

from __future__ import annotations

import logging

import torch

from dinoscale import checkpoint, distributed
from dinoscale.train.build import Run

log = logging.getLogger("dinoscale")


def save_run(run: Run, step: int, *, bad_steps: int) -> None:
    """Checkpoint ``run`` after ``step`` optimizer steps (collective: every rank calls it)."""
    checkpoint.save_checkpoint(
        run.output_dir, step, student=run.student, teacher=run.teacher, optimizer=run.optimizer, method=run.method,
        trainer_state={"consecutive_bad_steps": bad_steps, "data_position_step": step,
                       "global_batch_size": run.global_batch},
        keep=run.cfg.train.keep_checkpoints,
    )


def resume_run(run: Run) -> tuple[int, int]:
    """Seed this rank's RNG streams, then, with ``train.resume``, load the latest checkpoint of the run's
    directory into it: weights, optimizer, loss state and (same world size) the RNG streams as they were.

    Returns ``(start_step, consecutive_bad_steps)``, both 0 for a new run.
    """
    cfg, rank, world_size = run.cfg, distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(cfg.train.seed + 1 + rank)  # drop path etc. differ per rank
    latest = checkpoint.latest_checkpoint(run.output_dir) if cfg.train.resume else None
    if latest is None:
        if rank == 0:
            log.info("starting a new run in %s", run.output_dir)
        return 0, 0
    meta = checkpoint.load_checkpoint(
        latest, student=run.student, teacher=run.teacher, optimizer=run.optimizer, method=run.method
    )
    start_step, bad_steps = meta["step"], meta.get("consecutive_bad_steps", 0)
    if meta.get("global_batch_size", run.global_batch) != run.global_batch:
        # the data position is a step of the global sample stream: another global batch moves it
        log.warning("resuming with global batch %d, the checkpoint was written with %d: the data stream "
                    "continues at sample %d, not where the run stopped", run.global_batch,
                    meta["global_batch_size"], start_step * run.global_batch)
    if "rank_state" in meta:
        checkpoint.set_rng_state(meta["rank_state"]["rng"])
    else:  # resharded resume: RNG streams cannot be matched rank to rank; derive fresh ones
        torch.manual_seed(cfg.train.seed + 1 + rank + 1_000_003 * start_step)
    if rank == 0:
        log.info("resumed from %s at step %d (world size %d -> %d)", latest, start_step, meta["world_size"],
                 world_size)
    return start_step, bad_steps
