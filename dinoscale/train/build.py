"""Building a training run from its config: the networks, their parallelism, the optimizer, the schedules, the
throughput meter and the data.

:func:`build_run` does it all in training's order (the seeding and the order matter for the initial weights)
and returns a :class:`Run`; the loop then resumes it (``dinoscale.train.resume``) and steps it.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from dinoscale import distributed
from dinoscale.config import save_config
from dinoscale.cpu_malloc import keep_freed_memory
from dinoscale.data.open import open_dataset
from dinoscale.data.loader import PretrainLoader, build_pretrain_loader
from dinoscale.data.shard_writer import write_shards
from dinoscale.data.sources.shards import ShardDataset
from dinoscale.data.seeding import derive_seed
from dinoscale.data.steps import default_stream_groups, usable_workers
from dinoscale.data.streams import StreamGroups
from dinoscale.device import autocast as autocast_in, dtype_from_name, resolve_device, training_autocast_dtype
from dinoscale.methods.base import frozen_networks, student_units, uses_sample_index
from dinoscale.methods.registry import build_method
from dinoscale.parallel import (activation_checkpointing_mode, build_mesh, parallelize, parallelize_frozen,
                                parallelize_student_teacher)
from dinoscale.train.continue_from import (
    check_continued,
    init_heads_from_data_,
    load_pretrained_backbone,
    will_resume,
)
from dinoscale.train.perf.flops import example_batch
from dinoscale.train.perf.meter import ThroughputMeter, throughput_meter
from dinoscale.train.optim import build_optimizer, get_param_groups, init_state_
from dinoscale.train.schedules import Schedules, build_schedules, scale_lr
from dinoscale.train.step import device_batch
from dinoscale.train.teacher import init_teacher_from_student_

log = logging.getLogger("dinoscale")


@dataclass
class Run:
    """Everything a training run steps, built once by :func:`build_run`."""

    cfg: DictConfig
    device: torch.device
    output_dir: Path
    method: nn.Module  # the loss, and its state (e.g. centers)
    student: nn.ModuleDict
    teacher: nn.ModuleDict | None  # None for methods without an EMA teacher
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    max_steps: int  # where this run stops: train.max_steps, or the schedules' end
    global_batch: int  # images per optimizer step, over all ranks
    autocast_dtype: torch.dtype | None  # the forward's autocast dtype (train.autocast), None for full precision
    meter: ThroughputMeter | None  # FLOP/s and MFU, when train.log_throughput and the count succeeded

    @property
    def eval_name(self) -> str:
        """Which network evaluation and export use: the teacher when there is one."""
        return "teacher" if self.teacher is not None else "student"

    @property
    def eval_net(self) -> nn.ModuleDict:
        return self.teacher if self.teacher is not None else self.student

    def autocast(self):
        """The autocast context of training's forward (``train.autocast``)."""
        return autocast_in(self.device, self.autocast_dtype)


def build_run(cfg: DictConfig) -> Run:
    """The run directory (with its config), the networks in training mode (parallelism applied), the
    optimizer, the schedules and the throughput meter."""
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()  # glibc: reuse freed tensor memory instead of faulting in fresh pages each step
    output_dir = Path(cfg.train.output_dir)
    if distributed.get_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")

    method, student, teacher = build_networks(cfg, device)
    # FLOPs of one step are counted once, on the unsharded networks (fvcore cannot trace FSDP shards)
    meter = build_throughput_meter(cfg, method, student, teacher, device) if cfg.train.log_throughput else None
    apply_parallelism(cfg.compute, student, teacher, frozen=frozen_networks(method),
                      frozen_dtype=compute_dtype(cfg, device))
    optimizer = optimizer_from_config(cfg, student)
    global_batch = cfg.train.batch_size_per_rank * distributed.get_world_size()
    schedules = schedules_from_config(cfg, global_batch)
    max_steps = planned_steps(cfg)

    student.train()  # drop path on
    if teacher is not None:
        teacher.eval()
    return Run(cfg=cfg, device=device, output_dir=output_dir, method=method, student=student, teacher=teacher,
               optimizer=optimizer, schedules=schedules, max_steps=max_steps, global_batch=global_batch,
               autocast_dtype=training_autocast_dtype(cfg.train.autocast, device), meter=meter)


def build_networks(cfg: DictConfig, device: torch.device):
    """``(method, student, teacher)`` on ``device``, with the same initial weights on every rank (seeded): the
    student's backbone from ``model.pretrained_weights`` when set, its heads' prototypes from k-means of the data
    with ``continued.head_init=kmeans`` (a new run; ``dinoscale.train.continue_from``), the teacher (if the method
    has one) a frozen copy of the student. The method's frozen networks (a distillation teacher) go to ``device``
    too."""
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    if cfg.model.pretrained_weights:
        load_pretrained_backbone(student["backbone"], cfg.model)
    student.to(device), method.to(device)
    check_continued(cfg.continued)
    if cfg.continued.head_init == "kmeans" and not will_resume(cfg):
        dtype = training_autocast_dtype(cfg.train.autocast, device)
        with closing(head_init_batches(cfg, method, device)) as batches:
            init_heads_from_data_(method, student, batches, cfg.continued, seed=cfg.train.seed,
                                  autocast=lambda: autocast_in(device, dtype))
    if teacher is not None:
        teacher.to(device)
        init_teacher_from_student_(teacher, student)
    for network in frozen_networks(method).values():
        network.to(device)
    return method, student, teacher


def head_init_batches(cfg: DictConfig, method, device: torch.device):
    """This rank's first ``continued.head_init_batches`` training batches, on ``device`` (photometry applied
    there with ``crops.photometric_on_device``): the data of the heads' k-means initialisation."""
    rank = distributed.get_rank()
    batches = build_data(cfg, method, patch_size=cfg.model.patch_size, start_step=0,
                         streams=default_stream_groups(cfg.train.num_workers, distributed.get_world_size()))
    try:
        for step in range(cfg.continued.head_init_batches):
            seed = derive_seed(cfg.train.seed, "head_init_photometric", step, rank)
            yield device_batch(next(batches), device, photometric_seed=seed if cfg.crops.photometric_on_device
                               else None)
    finally:
        batches.close()


def apply_parallelism(compute: DictConfig, student, teacher, *, frozen: dict[str, nn.Module] | None = None,
                      frozen_dtype: torch.dtype | None = None) -> None:
    """FSDP2 sharding (when a process group exists), activation checkpointing and compile, from ``compute:``; the
    ``frozen`` networks (a distillation teacher) cast to ``frozen_dtype`` (the compute dtype) and sharded for
    inference only."""
    mesh = build_mesh(hybrid_shard=compute.hybrid_shard) if distributed.is_enabled() else None
    options = dict(
        mesh=mesh,
        param_dtype=dtype_from_name(compute.param_dtype, what="compute.param_dtype"),
        reduce_dtype=dtype_from_name(compute.reduce_dtype, what="compute.reduce_dtype"),
        reshard_after_forward=compute.reshard_after_forward,
        activation_checkpointing=activation_checkpointing_mode(compute.activation_checkpointing),
        compile_blocks=compute.compile,
    )
    if teacher is not None:
        parallelize_student_teacher(student, teacher, **options)
    else:
        for key, part in student.items():
            parallelize(part, **{**options, "activation_checkpointing": options["activation_checkpointing"]
                                 if key == "backbone" else "none"})
    for network in (frozen or {}).values():
        parallelize_frozen(network, mesh=mesh, dtype=frozen_dtype, compile_blocks=compute.compile)


def optimizer_from_config(cfg: DictConfig, student: nn.ModuleDict) -> torch.optim.Optimizer:
    """AdamW over the student's parameter groups (layer-wise lr decay, patch-embed lr, no decay on norms/biases);
    further students (distillation) get groups of their own, decayed over their own depth."""
    groups = []
    for unit in student_units(student).values():
        groups += get_param_groups(
            unit,
            lr_decay_rate=cfg.optim.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
            n_blocks=unit["backbone"].n_blocks,
        )
    optimizer = build_optimizer(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    if cfg.continued.backbone_warmup_steps > 0:
        init_state_(optimizer)  # the frozen backbone's AdamW state exists (untouched) in warm-up checkpoints
    return optimizer


def planned_steps(cfg: DictConfig) -> int:
    """The step a run ends at: the scheduled length (``optim.epochs`` x ``train.official_epoch_length``), or
    ``train.max_steps`` when that is set and smaller."""
    total = cfg.optim.epochs * cfg.train.official_epoch_length
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def schedules_from_config(cfg: DictConfig, global_batch: int) -> Schedules:
    """lr, weight decay, teacher momentum and temperature per step (``optim.schedule``: DINOv2's cosines or
    DINOv3's constants), the Gram loss weight with ``gram.enabled``; the lr scaled with the global batch when
    ``optim.scale_lr_with_batch``."""
    base_lr = scale_lr(cfg.optim.base_lr, global_batch) if cfg.optim.scale_lr_with_batch else cfg.optim.base_lr
    epoch_length = cfg.train.official_epoch_length
    return build_schedules(
        total_steps=cfg.optim.epochs * epoch_length,
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
        shape=cfg.optim.schedule,
        gram_loss_weight=gram_loss_weight(cfg.gram),
    )


def gram_loss_weight(gram: DictConfig) -> dict | float | None:
    """The Gram loss weight's schedule (``gram.loss_weight_schedule`` when enabled, else the constant
    ``gram.loss_weight``); None without Gram anchoring."""
    if not gram.enabled:
        return None
    schedule = gram.loss_weight_schedule
    if not schedule.enabled:
        return float(gram.loss_weight)
    return {k: schedule[k] for k in ("start", "peak", "end", "warmup_epochs", "cosine_epochs")}


def compute_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype, else FSDP's param_dtype when sharded, else fp32."""
    dtype = training_autocast_dtype(cfg.train.autocast, device)
    if dtype is not None:
        return dtype
    return dtype_from_name(cfg.compute.param_dtype) if distributed.is_enabled() else torch.float32


def build_throughput_meter(cfg: DictConfig, method, student, teacher, device: torch.device) -> ThroughputMeter | None:
    """Count one step's FLOPs on a batch shaped like training's and look up the peak; None if either fails.

    The count traces the full per-rank batch (one forward without gradients, a few seconds for the
    quickstart); RNG streams and buffers are left as they were, so training is unchanged by it.
    """
    batch = example_batch(method, student["backbone"].patch_size, cfg.train.batch_size_per_rank, device=device)
    return throughput_meter(method, student, teacher, batch, device=device, dtype=compute_dtype(cfg, device),
                            window=cfg.train.log_every)


def ensure_shards(cfg: DictConfig) -> None:
    """Write ``train.dataset``'s shards from ``train.build_shards_from`` on first use (rank 0; others wait)."""
    target = Path(cfg.train.dataset)
    if not cfg.train.build_shards_from or (target / "index.json").exists():
        return
    if distributed.get_rank() == 0:
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


def build_data(cfg: DictConfig, method, *, patch_size: int, start_step: int, streams: StreamGroups) -> PretrainLoader:
    """The infinite iterator of this rank's collated batches, starting at ``start_step``; shards are read as
    ``streams`` (the run's stream groups, ``dinoscale.train.resume``), with as many DataLoader workers as divide
    its groups, at most ``train.num_workers``."""
    ensure_shards(cfg)
    dataset = open_dataset(cfg.train.dataset)
    num_workers = cfg.train.num_workers
    if isinstance(dataset, ShardDataset):
        num_workers = usable_workers(streams, num_workers)
        if num_workers != cfg.train.num_workers and distributed.get_rank() == 0:
            log.warning("train.num_workers=%d does not divide the run's %d shard stream groups (fixed at its first "
                        "start, they keep its batches exact): reading with %d DataLoader worker(s). Set num_workers "
                        "to a divisor of %d, or train.shard_stream_groups when starting a new run",
                        cfg.train.num_workers, streams.groups, num_workers, streams.groups)
    return build_pretrain_loader(
        dataset,
        method.build_transform(),
        method.build_collate(patch_size),
        batch_size_per_rank=cfg.train.batch_size_per_rank,
        num_workers=num_workers,
        seed=cfg.train.seed,
        start_step=start_step,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
        streams=streams,
        with_index=uses_sample_index(method),
    )
