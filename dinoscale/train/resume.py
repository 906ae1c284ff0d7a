"""A run's checkpoints as the loop writes and reads them: the networks (with the method's checkpointed frozen
ones, a Gram teacher), optimizer and loss state (``dinoscale.checkpoint``), each rank's RNG streams, and the
trainer state beside them: the count of consecutive skipped steps and the data position (the step, the global
batch it was counted in, and the shard stream groups fixed at the run's first start).

A resume continues the data exactly where the checkpoint left it, or refuses with :class:`ResumeError`: the
global batch (unless ``train.allow_global_batch_change``) and the shard stream groups are the checkpoint's.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from dinoscale import checkpoint, distributed
from dinoscale.data.steps import default_stream_groups
from dinoscale.data.streams import StreamGroups
from dinoscale.methods.base import checkpointed_networks
from dinoscale.train.build import Run

log = logging.getLogger("dinoscale")


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot continue exactly; the message says why and what to set."""


def save_run(run: Run, step: int, *, bad_steps: int, streams: StreamGroups,
             writer: checkpoint.CheckpointWriter | None = None) -> None:
    """Checkpoint ``run`` after ``step`` optimizer steps (collective: every rank calls it), with ``writer`` (in the
    background when it is a background writer; None: written before this returns)."""
    writer = writer or checkpoint.CheckpointWriter(background=False)
    writer.save(
        run.output_dir, step, student=run.student, teacher=run.teacher, optimizer=run.optimizer, method=run.method,
        networks=checkpointed_networks(run.method, step),
        trainer_state={"consecutive_bad_steps": bad_steps, "data_position_step": step,
                       "global_batch_size": run.global_batch, "shard_stream_groups": streams.groups,
                       "shard_streams_per_group": streams.streams_per_group},
        keep=run.cfg.train.keep_checkpoints,
    )


def resume_run(run: Run) -> tuple[int, int, StreamGroups]:
    """Seed this rank's RNG streams, then, with ``train.resume``, load the latest checkpoint of the run's
    directory into it: weights, optimizer, loss state and (same world size) the RNG streams as they were.

    Returns ``(start_step, consecutive_bad_steps, shard stream groups)``: 0, 0 and the config's groups for a new
    run, the checkpoint's for a resume. Raises :class:`ResumeError` when the data cannot continue exactly.
    """
    cfg, rank, world_size = run.cfg, distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(cfg.train.seed + 1 + rank)  # drop path etc. differ per rank
    latest = checkpoint.latest_checkpoint(run.output_dir) if cfg.train.resume else None
    if latest is None:
        if rank == 0:
            log.info("starting a new run in %s", run.output_dir)
        return 0, 0, configured_stream_groups(cfg, world_size)
    meta = checkpoint.load_checkpoint(
        latest, student=run.student, teacher=run.teacher, optimizer=run.optimizer, method=run.method,
        networks=lambda step: checkpointed_networks(run.method, step),
    )
    start_step, bad_steps = meta["step"], meta.get("consecutive_bad_steps", 0)
    check_global_batch(cfg, meta.get("global_batch_size", run.global_batch), run.global_batch, start_step)
    streams = recorded_stream_groups(cfg, meta)
    if "rank_state" in meta:
        checkpoint.set_rng_state(meta["rank_state"]["rng"])
    else:  # resharded resume: RNG streams cannot be matched rank to rank; derive fresh ones
        torch.manual_seed(cfg.train.seed + 1 + rank + 1_000_003 * start_step)
    if rank == 0:
        log.info("resumed from %s at step %d (world size %d -> %d)", latest, start_step, meta["world_size"],
                 world_size)
    return start_step, bad_steps, streams


def configured_stream_groups(cfg: DictConfig, world_size: int) -> StreamGroups:
    """The shard stream groups a run starts with: ``train.shard_stream_groups`` and
    ``train.shard_streams_per_group``, each 0 for one group per DataLoader worker and one stream per rank."""
    default = default_stream_groups(cfg.train.num_workers, world_size)
    return StreamGroups(groups=cfg.train.shard_stream_groups or default.groups,
                        streams_per_group=cfg.train.shard_streams_per_group or default.streams_per_group)


def check_global_batch(cfg: DictConfig, recorded: int, current: int, start_step: int) -> None:
    """Refuse a resume under another global batch unless ``train.allow_global_batch_change``: the data position
    is a step of the global sample stream, so another batch would skip or repeat samples."""
    if recorded == current:
        return
    world_size = distributed.get_world_size()
    if not cfg.train.allow_global_batch_change:
        same = (f"train.batch_size_per_rank={recorded // world_size}" if recorded % world_size == 0
                else f"a world size that divides {recorded}, with batch_size_per_rank {recorded} / world size")
        raise ResumeError(
            f"the checkpoint was written with a global batch of {recorded} images per step, this run has {current} "
            f"(batch_size_per_rank {current // world_size} x world size {world_size}). The data position is a step "
            f"of the global sample stream, so the run would not continue with the samples it stopped before. "
            f"Resume with {same}, or set train.allow_global_batch_change=true to continue at sample "
            f"{start_step * current} regardless (samples skipped or repeated), or start a new train.output_dir"
        )
    log.warning("resuming with global batch %d, the checkpoint was written with %d (train.allow_global_batch_change):"
                " the data stream continues at sample %d, not where the run stopped", current, recorded,
                start_step * current)


def recorded_stream_groups(cfg: DictConfig, meta: dict) -> StreamGroups:
    """The checkpoint's shard stream groups; a config that sets other ones is refused."""
    if "shard_stream_groups" in meta:
        streams = StreamGroups(groups=meta["shard_stream_groups"], streams_per_group=meta["shard_streams_per_group"])
    else:  # written before the groups were recorded: what the loader used then (one stream per worker and rank)
        streams = configured_stream_groups(cfg, meta["world_size"])
        log.warning("the checkpoint does not record its shard stream groups (an older checkpoint): assuming %s, "
                    "the default of its world size and of train.num_workers=%d; if num_workers changed since, the "
                    "shard batches differ from the uninterrupted run's", streams, cfg.train.num_workers)
    for key, value in (("shard_stream_groups", streams.groups), ("shard_streams_per_group", streams.streams_per_group)):
        if cfg.train[key] and cfg.train[key] != value:
            raise ResumeError(
                f"train.{key}={cfg.train[key]}, but the checkpoint's data position reads {value}: the stream groups "
                f"are fixed at a run's first start. Set train.{key}=0 (or {value}) to resume, or start a new "
                "train.output_dir"
            )
    return streams
