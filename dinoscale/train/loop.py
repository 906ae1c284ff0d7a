"""The training loop. Reads top to bottom: build -> resume -> (batch -> loss -> step -> EMA -> log) -> save -> eval.

It does not care whether the networks are sharded (``dinoscale.parallel`` decides, from the config and the
process group) or where batches come from (``dinoscale.data.loader.build_pretrain_loader``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from dinoscale import checkpoint, distributed
from dinoscale.cpu_malloc import keep_freed_memory
from dinoscale.device import autocast as autocast_in, dtype_from_name, resolve_device, training_autocast_dtype
from dinoscale.config import save_config
from dinoscale.data.loader import build_pretrain_loader
from dinoscale.data.open import open_dataset
from dinoscale.data.seeding import derive_seed
from dinoscale.data.transforms.photometric import photometric_collated
from dinoscale.methods.registry import build_method
from dinoscale.models.factory import build_backbone
from dinoscale.train.metrics import MetricLogger
from dinoscale.train.optim import apply_schedule_, build_optimizer, clip_grad_norm_, get_param_groups, step_unless_
from dinoscale.train.perf.flops import example_batch
from dinoscale.train.perf.meter import throughput_meter
from dinoscale.train.schedules import build_schedules, scale_lr
from dinoscale.train.teacher import ema_update_, init_teacher_from_student_

log = logging.getLogger("dinoscale")


@dataclass
class TrainResult:
    status: str  # "finished" | "preempted"
    step: int
    output_dir: str
    knn: dict[str, float] = field(default_factory=dict)


class TooManyBadSteps(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


def ensure_shards(cfg: DictConfig) -> None:
    """Write ``train.dataset``'s shards from ``train.build_shards_from`` on first use (rank 0; others wait)."""
    target = Path(cfg.train.dataset)
    if not cfg.train.build_shards_from or (target / "index.json").exists():
        return
    if distributed.get_rank() == 0:
        from dinoscale.data.shard_writer import write_shards

        source = cfg.train.build_shards_from
        # Fashion-MNIST writes both splits, OUT/train and OUT/test: train.dataset names one of them.
        is_fmnist = source.split(":")[0] == "fashion-mnist"
        out = target.parent if is_fmnist else target
        if is_fmnist and target.name not in ("train", "test"):
            raise ValueError(f"train.dataset must end in /train or /test when building Fashion-MNIST shards, "
                             f"got {target}")
        log.info("writing shards of %s to %s (first run only)", source, out)
        write_shards(source, out, max_samples_per_shard=5000, overwrite=True)
    distributed.barrier()


def build_data(cfg: DictConfig, method, *, patch_size: int, start_step: int):
    """The infinite iterator of this rank's collated batches, starting at ``start_step``."""
    ensure_shards(cfg)
    return build_pretrain_loader(
        open_dataset(cfg.train.dataset),
        method.build_transform(),
        method.build_collate(patch_size),
        batch_size_per_rank=cfg.train.batch_size_per_rank,
        num_workers=cfg.train.num_workers,
        seed=cfg.train.seed,
        start_step=start_step,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
    )


def apply_parallelism(compute: DictConfig, student, teacher) -> None:
    """FSDP2 sharding (when a process group exists), activation checkpointing and compile, from ``compute:``."""
    from dinoscale.parallel import build_mesh, parallelize, parallelize_student_teacher

    mesh = build_mesh(hybrid_shard=compute.hybrid_shard) if distributed.is_enabled() else None
    options = dict(
        mesh=mesh,
        param_dtype=dtype_from_name(compute.param_dtype, what="compute.param_dtype"),
        reduce_dtype=dtype_from_name(compute.reduce_dtype, what="compute.reduce_dtype"),
        reshard_after_forward=compute.reshard_after_forward,
        activation_checkpointing=compute.activation_checkpointing,
        compile_blocks=compute.compile,
    )
    if teacher is not None:
        parallelize_student_teacher(student, teacher, **options)
    else:
        for key, part in student.items():
            parallelize(part, **{**options, "activation_checkpointing": options["activation_checkpointing"]
                                 and key == "backbone"})


def compute_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype, else FSDP's param_dtype when sharded, else fp32."""
    dtype = training_autocast_dtype(cfg.train.autocast, device)
    if dtype is not None:
        return dtype
    return dtype_from_name(cfg.compute.param_dtype) if distributed.is_enabled() else torch.float32


def build_throughput_meter(cfg: DictConfig, method, student, teacher, device: torch.device):
    """Count one step's FLOPs on a batch shaped like training's and look up the peak; None if either fails.

    The count traces the full per-rank batch (one forward without gradients, a few seconds for the
    quickstart); RNG streams and buffers are left as they were, so training is unchanged by it.
    """
    batch = example_batch(method, student["backbone"].patch_size, cfg.train.batch_size_per_rank, device=device)
    return throughput_meter(method, student, teacher, batch, device=device, dtype=compute_dtype(cfg, device),
                            window=cfg.train.log_every)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(cfg: DictConfig, *, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()  # glibc: reuse freed tensor memory instead of faulting in fresh pages each step
    output_dir = Path(cfg.train.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")

    # --- networks: the same initial weights on every rank, then parallelism applied from one place
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    if cfg.model.pretrained_weights:
        from dinoscale.hub import load_state_dict_any

        load_state_dict_any(student["backbone"], cfg.model.pretrained_weights)
    if teacher is not None:
        init_teacher_from_student_(teacher, student)
        teacher.to(device)
    student.to(device), method.to(device)
    # FLOPs of one step are counted once, on the unsharded networks (fvcore cannot trace FSDP shards)
    meter = build_throughput_meter(cfg, method, student, teacher, device) if cfg.train.log_throughput else None
    apply_parallelism(cfg.compute, student, teacher)

    # --- optimizer and schedules
    n_blocks = student["backbone"].n_blocks
    optimizer = build_optimizer(
        get_param_groups(
            student,
            lr_decay_rate=cfg.optim.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
            n_blocks=n_blocks,
        ),
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
    )
    global_batch = cfg.train.batch_size_per_rank * world_size
    base_lr = scale_lr(cfg.optim.base_lr, global_batch) if cfg.optim.scale_lr_with_batch else cfg.optim.base_lr
    epoch_length = cfg.train.official_epoch_length
    total_steps = cfg.optim.epochs * epoch_length
    schedules = build_schedules(
        total_steps=total_steps,
        epoch_length=epoch_length,
        base_lr=base_lr,
        min_lr=cfg.optim.min_lr,
        warmup_epochs=cfg.optim.warmup_epochs,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        momentum_teacher=cfg.teacher.momentum_teacher,
        final_momentum_teacher=cfg.teacher.final_momentum_teacher,
        teacher_temp=cfg.teacher.teacher_temp,
        warmup_teacher_temp=cfg.teacher.warmup_teacher_temp,
        warmup_teacher_temp_epochs=cfg.teacher.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=cfg.optim.freeze_last_layer_epochs,
    )
    max_steps = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps

    # --- resume: weights, optimizer, centers, schedule position, RNG and data position
    start_step, bad_steps = 0, 0
    torch.manual_seed(cfg.train.seed + 1 + rank)  # drop path etc. differ per rank
    latest = checkpoint.latest_checkpoint(output_dir) if cfg.train.resume else None
    if latest is not None:
        meta = checkpoint.load_checkpoint(
            latest, student=student, teacher=teacher, optimizer=optimizer, method=method
        )
        start_step, bad_steps = meta["step"], meta.get("consecutive_bad_steps", 0)
        if meta.get("global_batch_size", global_batch) != global_batch:
            # the data position is a step of the global sample stream: another global batch moves it
            log.warning("resuming with global batch %d, the checkpoint was written with %d: the data stream "
                        "continues at sample %d, not where the run stopped", global_batch,
                        meta["global_batch_size"], start_step * global_batch)
        if "rank_state" in meta:
            checkpoint.set_rng_state(meta["rank_state"]["rng"])
        else:  # resharded resume: RNG streams cannot be matched rank to rank; derive fresh ones
            torch.manual_seed(cfg.train.seed + 1 + rank + 1_000_003 * start_step)
        if rank == 0:
            log.info("resumed from %s at step %d (world size %d -> %d)", latest, start_step,
                     meta["world_size"], world_size)
    elif rank == 0:
        log.info("starting a new run in %s", output_dir)

    metrics = MetricLogger(
        output_dir, total_steps=max_steps, log_every=cfg.train.log_every, tensorboard=cfg.train.tensorboard,
        enabled=rank == 0, start_step=start_step,
    )
    autocast = partial(autocast_in, device, training_autocast_dtype(cfg.train.autocast, device))
    batches = iter(build_data(cfg, method, patch_size=student["backbone"].patch_size, start_step=start_step))

    # Skipped steps are decided on the device; the host reads them only at log and checkpoint steps.
    bad_run = torch.tensor(float(bad_steps), device=device)  # consecutive non-finite steps, up to this step
    unreviewed: list[tuple[int, torch.Tensor]] = []  # (step, [skipped, loss, grad_norm, bad_run]) since the last read

    def review_skipped_steps() -> None:
        """Log the skipped steps since the last review, and stop after too many in a row (one host read)."""
        nonlocal bad_steps
        if not unreviewed:
            return
        steps = [s for s, _ in unreviewed]
        values = torch.stack([v for _, v in unreviewed]).tolist()
        unreviewed.clear()
        for s, (skipped, loss_value, norm_value, run) in zip(steps, values):
            if skipped:
                metrics.log_event(s, {"type": "skipped_step", "loss": loss_value, "grad_norm": norm_value,
                                      "consecutive_bad_steps": int(run)})
                log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", s, int(run))
            if run >= cfg.train.max_consecutive_bad_steps:
                raise TooManyBadSteps(
                    f"{int(run)} consecutive steps with a non-finite loss or gradient (up to step {s}); "
                    "stopping. Lower optim.base_lr, raise optim.warmup_epochs, or check the data. The last good "
                    f"checkpoint is in {checkpoint.checkpoint_root(output_dir)}."
                )
        bad_steps = int(values[-1][3])

    def save(step: int) -> None:
        review_skipped_steps()  # a run of bad steps too long stops here, before it reaches a checkpoint
        checkpoint.save_checkpoint(
            output_dir, step, student=student, teacher=teacher, optimizer=optimizer, method=method,
            trainer_state={"consecutive_bad_steps": bad_steps, "data_position_step": step,
                           "global_batch_size": global_batch},
            keep=cfg.train.keep_checkpoints,
        )

    # --- the loop
    eval_net = teacher if teacher is not None else student  # what evaluation and export use
    student.train()
    if teacher is not None:
        teacher.eval()
    step, status = start_step, "finished"
    if meter is not None:
        meter.restart()  # building, resuming and starting the loader are not step time
    while step < max_steps:
        batch = _to_device(next(batches), device)
        if cfg.crops.photometric_on_device:  # colour jitter, blur, solarize as batched ops on the device
            generator = torch.Generator(device).manual_seed(derive_seed(cfg.train.seed, "photometric", step, rank))
            batch = photometric_collated(batch, generator)
        sched = schedules.at(step)
        apply_schedule_(optimizer, lr=sched["lr"], wd=sched["wd"], last_layer_lr=sched["last_layer_lr"])
        centers = {k: v.clone() for k, v in method.named_buffers()}  # restored if the step is skipped

        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, terms = method(student, teacher, batch, sched)
        loss.backward()
        grad_norm = clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)

        # A step whose loss or gradient is not finite on any rank is skipped on the device, without a host
        # sync: the fused AdamW skips on the device, the EMA weight becomes 0, the loss centers are restored.
        nonfinite = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float().reshape(1)
        skip = (distributed.all_reduce_sum_(nonfinite) > 0).reshape(())
        step_unless_(optimizer, skip)
        if teacher is not None:
            ema_update_(teacher, student, torch.where(skip, 1.0, sched["momentum"]))
        buffers = dict(method.named_buffers())
        for name, saved in centers.items():
            buffers[name].copy_(torch.where(skip, saved, buffers[name]))
        bad_run = torch.where(skip, bad_run + 1, 0.0)
        step += 1
        unreviewed.append((step, torch.stack([skip.float(), loss.detach().float(), grad_norm.detach().float(),
                                              bad_run])))
        if meter is not None:
            meter.update()

        data_stats = {}
        is_log_step = step % cfg.train.log_every == 0 or step == max_steps
        if is_log_step:
            review_skipped_steps()
            # logged losses are means over ranks (each rank's is its local batch mean); data damage is summed
            losses = torch.stack([loss.detach().float(), *(v.float() for v in terms.values())])
            loss, *term_values = (distributed.all_reduce_sum_(losses) / world_size).unbind()
            terms = dict(zip(terms, term_values))
            counts = batches.stats()
            summed = distributed.all_reduce_sum_(
                torch.tensor(list(counts.values()), dtype=torch.float64, device=device))
            data_stats = {f"data/{k}": v for k, v in zip(counts, summed.tolist())}
            if meter is not None:  # this rank's achieved FLOP/s over the last log_every steps, and MFU
                data_stats.update({f"perf/{k}": v for k, v in meter.stats().items()})
        metrics.log(step, {**data_stats, "loss": loss.detach(), **{f"loss/{k}": v for k, v in terms.items()},
                           "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                           "teacher_temp": sched["teacher_temp"], "grad_norm": grad_norm,
                           "skipped_steps_in_a_row": bad_run}, n_images=global_batch)
        # A stop request (SIGTERM/USR1/USR2) is a host flag: one process reads it every step; several processes
        # agree on it at log steps (one small all-reduce), so a stop waits at most train.log_every steps.
        stop = False
        if stop_requested is not None:
            if world_size == 1:
                stop = bool(stop_requested())
            elif is_log_step:
                flag = torch.tensor([float(bool(stop_requested()))], device=device)
                stop = distributed.all_reduce_sum_(flag).item() > 0
        if stop:
            save(step)
            status = "preempted"
            log.warning("stop requested: checkpoint saved at step %d", step)
            break
        pause = False  # a checkpoint or an evaluation: not step time for the throughput meter
        if step % cfg.train.checkpoint_every == 0 or step == max_steps:
            save(step)
            pause = True
        if cfg.evaluation.period and step % cfg.evaluation.period == 0 and step < max_steps:
            knn = evaluate_knn(cfg, eval_net["backbone"], device)
            metrics.log_event(step, {"type": "eval", **knn})
            # the weights each evaluation saw, loadable like any released backbone
            export_network(eval_net, output_dir / "eval" / f"step_{step:09d}", "teacher" if teacher is not None else "student")
            pause = True
        if pause and meter is not None:
            meter.restart()

    metrics.close()
    result = TrainResult(status=status, step=step, output_dir=str(output_dir))
    if status == "finished":
        export_network(eval_net, output_dir / "export", "teacher" if teacher is not None else "student")
        if cfg.evaluation.final_knn and cfg.evaluation.knn_train_dataset:
            torch.manual_seed(cfg.train.seed)  # the very network training started from
            random_init = build_backbone(cfg.model, drop_path_rate=0.0).to(device)
            trained = evaluate_knn(cfg, eval_net["backbone"], device)
            untrained = evaluate_knn(cfg, random_init, device)
            result.knn = {"teacher": trained[f"knn/top1@{cfg.evaluation.knn_k}"],
                          "random_init": untrained[f"knn/top1@{cfg.evaluation.knn_k}"]}
            if rank == 0:
                MetricLogger.append_jsonl(output_dir / "metrics.jsonl",
                                          {"type": "final_knn", "step": step, **result.knn})
    return result


def export_network(network: torch.nn.Module, export_dir: Path, name: str) -> None:
    """``NAME_backbone`` in the official DINOv2 layout (.pth + .safetensors), and ``NAME_heads`` beside it."""
    full = checkpoint.full_state_dict(network)  # collective: every rank calls it
    if distributed.get_rank() == 0:
        backbone = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
        heads = {k: v for k, v in full.items() if not k.startswith("backbone.")}
        checkpoint.save_backbone(backbone, export_dir / f"{name}_backbone")
        if heads:
            checkpoint.save_backbone(heads, export_dir / f"{name}_heads")
    distributed.barrier()


def evaluate_knn(cfg: DictConfig, backbone: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Weighted cosine kNN of ``backbone``'s CLS features on the configured labeled datasets."""
    from dinoscale.eval.extract import extract_features
    from dinoscale.eval.transforms import eval_transform
    from dinoscale.eval.knn import knn_classify

    ev = cfg.evaluation
    transform = eval_transform(ev.knn_image_size, backbone.patch_size)
    train_set = open_dataset(ev.knn_train_dataset, transform=transform, max_samples=ev.knn_max_train_samples)
    test_set = open_dataset(ev.knn_test_dataset, transform=transform, max_samples=ev.knn_max_test_samples)
    was_training = backbone.training
    backbone.eval()
    kw = dict(batch_size=256, num_workers=min(cfg.train.num_workers, 4), device=device, progress=False)
    train_feats = extract_features(backbone, train_set, **kw)
    test_feats = extract_features(backbone, test_set, **kw)
    backbone.train(was_training)
    results = knn_classify(train_feats["cls"], train_feats["labels"], test_feats["cls"], test_feats["labels"],
                           ks=(ev.knn_k,), temperature=ev.knn_temperature)
    return {f"knn/top1@{k}": v["top1"] for k, v in results.items()} | {
        f"knn/top5@{k}": v["top5"] for k, v in results.items()}

