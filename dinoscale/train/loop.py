"""The training loop. Reads top to bottom: build -> resume -> (batch -> step -> log -> stop? -> checkpoint ->
evaluate) -> export -> final kNN.

The parts live beside it: building (``build``), checkpoints (``resume``), the step and its skip of non-finite
steps (``step``), when to log/checkpoint/evaluate/stop (``cadence``), evaluation and export (``evaluate``). The
loop does not care whether the networks are sharded (``dinoscale.parallel`` decides, from the config and the
process group) or where batches come from (``dinoscale.data.loader.build_pretrain_loader``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from omegaconf import DictConfig

from dinoscale import checkpoint, distributed
from dinoscale.data.seeding import derive_seed
from dinoscale.data.loader import PretrainLoader
from dinoscale.methods.base import before_step
from dinoscale.train.build import Run, build_data, build_run
from dinoscale.train.cadence import should_checkpoint, should_evaluate, should_log, stop_agreed
from dinoscale.train.evaluate import evaluate_during_training, export_network, final_knn
from dinoscale.train.metrics import MetricLogger
from dinoscale.train.resume import resume_run, save_run
from dinoscale.train.step import SkippedStepReview, StepResult, device_batch, train_step
from dinoscale.train.trackers import check_trackers, open_trackers

log = logging.getLogger("dinoscale")

# Seconds a failed run waits for the background save in flight before it reports its error (lifecycle.teardown
# then gives the write as long again before the process exits).
FAILED_RUN_SAVE_WAIT_S = 10.0


@dataclass
class TrainResult:
    status: str  # "finished" | "preempted"
    step: int
    output_dir: str
    knn: dict[str, float] = field(default_factory=dict)


def train(cfg: DictConfig, *, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    rank = distributed.get_rank()
    check_trackers(cfg)  # a missing optional package fails here, before the run is built
    run = build_run(cfg)
    start_step, bad_steps, streams = resume_run(run)
    trackers = open_trackers(cfg, run.output_dir, resume=start_step > 0) if rank == 0 else []
    metrics = MetricLogger(run.output_dir, total_steps=run.max_steps, log_every=cfg.train.log_every,
                           tensorboard=cfg.train.tensorboard, enabled=rank == 0, start_step=start_step,
                           trackers=trackers)
    batches = iter(build_data(cfg, run.method, patch_size=run.student["backbone"].patch_size, start_step=start_step,
                              streams=streams))
    skipped = SkippedStepReview(metrics, max_in_a_row=cfg.train.max_consecutive_bad_steps, bad_steps=bad_steps,
                                checkpoint_dir=checkpoint.checkpoint_root(run.output_dir))
    bad_run = torch.tensor(float(bad_steps), device=run.device)  # consecutive skipped steps, on the device

    # train.async_checkpoint: checkpoints are copied to CPU memory and written while the next steps run
    writer = checkpoint.CheckpointWriter(background=cfg.train.async_checkpoint)

    step, status = start_step, "finished"
    if run.meter is not None:
        run.meter.restart()  # building, resuming and starting the loader are not step time
    try:  # a failed run still flushes its metrics and stops its loader workers (no hang at exit)
        while step < run.max_steps:
            on_device = cfg.crops.photometric_on_device
            seed = derive_seed(cfg.train.seed, "photometric", step, rank) if on_device else None
            batch = device_batch(next(batches), run.device, photometric_seed=seed)
            sched = run.schedules.at(step)
            before_step(run.method, step, run.teacher)  # e.g. the Gram teacher's copy of the EMA teacher, when due
            out = train_step(run.method, run.student, run.teacher, run.optimizer, batch, sched, bad_run,
                             clip_grad=cfg.optim.clip_grad, autocast=run.autocast,
                             backbone_frozen=step < cfg.continued.backbone_warmup_steps)  # heads-only warm-up
            step, bad_run = step + 1, out.bad_run
            skipped.add(step, out)
            if run.meter is not None:
                run.meter.update()

            is_log_step = should_log(step, log_every=cfg.train.log_every, max_steps=run.max_steps)
            if is_log_step:
                skipped.review()
            log_step(metrics, run, step, out, sched, batches, is_log_step=is_log_step)

            writer.poll(run.device, log_step=is_log_step)  # a failed background save stops the run here
            stop = stop_agreed(stop_requested, log_step=is_log_step, device=run.device)
            saved = stop or should_checkpoint(step, checkpoint_every=cfg.train.checkpoint_every,
                                              max_steps=run.max_steps)
            if saved:
                skipped.review()  # a run of bad steps too long stops here, before it reaches a checkpoint
                save_run(run, step, bad_steps=skipped.bad_steps, streams=streams, writer=writer)
            if stop:
                writer.wait()  # complete before the process exits
                status = "preempted"
                log.warning("stop requested: checkpoint saved at step %d", step)
                break
            evaluated = should_evaluate(step, period=cfg.evaluation.period, max_steps=run.max_steps)
            if evaluated:
                evaluate_during_training(run, step, metrics)
            if (saved or evaluated) and run.meter is not None:
                run.meter.restart()  # a checkpoint or an evaluation is not step time
        writer.close()  # the last checkpoint is complete (or its error raised) before train() returns
    except BaseException:
        # The error that ends the run is the one to report. A save still in flight (an earlier, intact state) gets a
        # bounded wait: with several processes its collectives may wait for a rank that failed; its own failure is
        # only logged.
        try:
            writer.close(timeout=FAILED_RUN_SAVE_WAIT_S)
        except Exception as exc:
            log.error("the checkpoint being written when the run failed was not completed: %s", exc)
        raise
    finally:
        metrics.close()
        batches.close()
    result = TrainResult(status=status, step=step, output_dir=str(run.output_dir))
    if status == "finished":
        export_network(run.eval_net, run.output_dir / "export", run.eval_name)
        if cfg.evaluation.final_knn and cfg.evaluation.knn_train_dataset:
            result.knn = final_knn(run, step)
    return result


def log_step(metrics: MetricLogger, run: Run, step: int, out: StepResult, sched: dict[str, float],
             batches: PretrainLoader, *, is_log_step: bool) -> None:
    """Hand the step to the logger, which writes every ``train.log_every`` steps. At log steps the losses are
    means over ranks (each rank's is its local batch mean), data damage is summed, and the throughput added."""
    loss, terms, extra = out.loss, out.terms, {}
    if is_log_step:
        losses = torch.stack([loss.float(), *(v.float() for v in terms.values())])
        loss, *term_values = (distributed.all_reduce_sum_(losses) / distributed.get_world_size()).unbind()
        terms = dict(zip(terms, term_values))
        counts = batches.stats()
        summed = distributed.all_reduce_sum_(torch.tensor(list(counts.values()), dtype=torch.float64,
                                                          device=run.device))
        extra = {f"data/{k}": v for k, v in zip(counts, summed.tolist())}
        if run.meter is not None:  # this rank's achieved FLOP/s over the last log_every steps, and MFU
            extra.update({f"perf/{k}": v for k, v in run.meter.stats().items()})
    metrics.log(step, {**extra, "loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
                       "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                       "teacher_temp": sched["teacher_temp"], "grad_norm": out.grad_norm,
                       **({"gram_loss_weight": sched["gram_loss_weight"]} if "gram_loss_weight" in sched else {}),
                       "skipped_steps_in_a_row": out.bad_run}, n_images=run.global_batch)
