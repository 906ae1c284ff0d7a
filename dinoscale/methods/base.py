"""The contract between a self-supervised method and the code that trains, checkpoints and measures it.

``Method`` is the interface ``dinoscale.train.loop.train``, ``dinoscale.checkpoint``, ``dinoscale.train.perf.flops``
and the benchmarks rely on. Methods do not inherit from it: every ``nn.Module`` with these members is a
``Method`` (``isinstance`` checks that the members exist, ``tests/methods/test_method_protocol.py`` that every
registered method keeps the whole contract).

One training step, as the loop runs it::

    method = build_method(cfg)                     # dinoscale.methods.registry
    student, teacher = method.build_networks()     # right after torch.manual_seed(cfg.train.seed)
    ...                                            # teacher <- student's weights, parallelism, optimizer(student)
    batch = build_collate(patch_size)([(build_transform()(image), label), ...], rng=step_rng)
    saved = {k: v.clone() for k, v in method.named_buffers()}
    loss, terms = method(student, teacher, batch, schedules.at(step))   # under autocast
    loss.backward(); optimizer step; teacher EMA
    if the step was skipped: method's buffers <- saved

Optional extensions, used by distillation (``dinoscale.methods.distillation``) and by the Gram anchoring of the
DINOv2 family (``dinoscale.methods.gram``), read here:

* ``method.frozen_networks()``: the networks the method runs without ever training them (a frozen teacher,
  the Gram teacher, BEiT's tokenizer), by name. The loop moves them to the device in the compute dtype and shards them
  (``parallel.parallelize_frozen``); they are never optimized (see :func:`frozen_networks`).
* ``method.checkpointed_networks(step)``: those of them whose weights are part of the training state after
  ``step`` optimizer steps (the Gram teacher, a copy of an earlier EMA teacher), by name: saved in every
  checkpoint and required when resuming one (see :func:`checkpointed_networks`). The others are rebuilt from
  their source on every start.
* ``method.before_step(step, teacher)``: called by the loop on every rank before each step's forward, with the
  EMA teacher (the Gram teacher's copy of it when due). What it does must depend on ``step`` only, so that a
  resumed run does the same (see :func:`before_step`).
* further students: ``student["students"]`` (and the EMA teacher's) may be an ``nn.ModuleDict`` of complete
  students, each with its own ``backbone``, trained on the same batches. Each gets its own layer-wise lr decay
  and gradient clipping, and is exported beside the first (see :func:`student_units`).
* ``method.sample_index = True``: the collate's samples are ``(transform(image), label, index)`` with ``index``
  the sample's dataset index, a stable id in ``[0, len(dataset))`` (PIRL's memory bank, see
  :func:`uses_sample_index`; the data loader gives it for map-style datasets only).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import torch
from omegaconf import DictConfig
from torch import nn

__all__ = [
    "FURTHER_STUDENTS", "Batch", "Collate", "Method", "before_step", "checkpointed_networks", "frozen_networks",
    "split_students", "student_units", "uses_sample_index",
]

FURTHER_STUDENTS = "students"
"""The key of a student's ``nn.ModuleDict`` of further students (and of its EMA teacher's)."""

Batch = dict[str, Any]
"""A collated batch: tensors (moved to the device by the loop) and plain values, keyed as the method's collate
chooses (``global_crops``, ``local_crops``, ``masks``, ... for the multi-crop methods; ``images`` for SimMIM and
BEiT)."""

Collate = Callable[..., Batch]
"""``collate(samples, *, rng: random.Random) -> Batch``, ``samples`` a list of ``(transform(image), label)``."""


@runtime_checkable
class Method(Protocol):
    """A training objective: which networks to train, which views to show them, and the loss of a batch.

    A method is an ``nn.Module`` that holds no parameters (the optimizer sees the student's only); its buffers
    are its whole state (e.g. the DINO and iBOT loss centers, see :meth:`named_buffers`).
    """

    cfg: DictConfig
    """The config the method was built from. The FLOP counter keys its cache on it and reads
    ``teacher.teacher_temp`` from it for the traced step's schedule values."""

    uses_teacher: bool
    """Whether :meth:`build_networks` returns an EMA teacher (True) or ``None`` (False)."""

    def build_networks(self) -> tuple[nn.ModuleDict, nn.ModuleDict | None]:
        """``(student, teacher)``, built on the CPU; the loop moves them to the device and shards them.

        ``student["backbone"]`` is a ``DinoVisionTransformer``: the loop reads its ``patch_size`` and
        ``n_blocks``, loads ``model.pretrained_weights`` into it, and evaluates and exports it when there is no
        teacher. The student's backbone is the first network built (so the loop's seed fixes it: the
        benchmarks' "random init" rebuilds it). Every student parameter that requires grad must take part in the
        loss, since the optimizer's state, which is checkpointed, has to cover every parameter it optimizes: turn
        off ``requires_grad`` of what the objective never uses (e.g. ``backbone.mask_token`` without masking).

        ``teacher`` is an EMA copy of the student: the same keys and parameter names (the loop copies the
        student's weights into it, freezes it and updates it as ``m * teacher + (1 - m) * student`` after
        every step, ``m = sched["momentum"]``); it may differ in what holds no weights (drop path 0). It is
        what evaluation and export use. ``None`` means the method has no teacher: no EMA, and evaluation and
        export use the student's backbone.
        """
        ...

    def build_transform(self) -> Callable[[Any], Any]:
        """The per-sample transform: the data loader applies it to each decoded image of the dataset, in its
        worker processes, with torch's global RNG seeded by the sample's stream position; its outputs are the
        ``samples`` of :meth:`build_collate`'s function."""
        ...

    def build_collate(self, patch_size: int) -> Collate:
        """The collate function for batches of this rank, given the backbone's ``patch_size``.

        It is called as ``collate(samples, rng=random.Random(step_seed))`` with the same ``rng`` on every rank
        (draw batch-level randomness such as masks from it for the global batch, and keep this rank's share,
        so that a step's batch does not depend on the number of ranks). With
        ``crops.photometric_on_device`` its batches hold uint8 ``global_crops`` (2B crop-major) and
        ``local_crops``, which the loop augments on the device before :meth:`forward`.
        """
        ...

    def forward(
        self, student: nn.ModuleDict, teacher: nn.ModuleDict | None, batch: Batch, sched: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch (called as ``method(student, teacher, batch, sched)``, under autocast).

        Args:
            student: the (possibly sharded) student, in train mode.
            teacher: the teacher in eval mode, ``None`` for methods without one. The method must not change its
                weights (the EMA update is the loop's).
            batch: this rank's collated batch, tensors on the device.
            sched: this step's schedule values ``lr``, ``wd``, ``momentum``, ``teacher_temp`` and
                ``last_layer_lr`` (``dinoscale.train.schedules``), with ``gram.enabled`` also
                ``gram_loss_weight``; methods read what they need, e.g. ``teacher_temp``.

        Returns:
            ``(loss, terms)``: ``loss`` the scalar to backpropagate, this rank's loss (gradients are averaged
            over ranks); ``terms`` the named parts to log, detached 0-d tensors, the same keys in the same
            order on every rank and every step (the loop all-reduces them and logs ``loss/<name>``).

        It may update the method's buffers in place (e.g. an EMA center). Collectives are allowed: every rank
        calls forward on every step. The FLOP counter also runs it once, traced under ``torch.no_grad``
        with collectives off, restoring the buffers and the RNG state afterwards.
        """
        ...

    def __call__(
        self, student: nn.ModuleDict, teacher: nn.ModuleDict | None, batch: Batch, sched: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` (``nn.Module.__call__``): how the loop and the FLOP counter call the method."""
        ...

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The method's state, as ``nn.Module`` lists it: every buffer is cloned before each step and copied
        back when the step is skipped (a non-finite loss or gradient on any rank), so a skipped step leaves no
        trace. The persistent ones are checkpointed (:meth:`state_dict`)."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Saved in every checkpoint under ``"method"`` (the buffers, e.g. ``dino_loss.center``); the names
        are part of the checkpoint format."""
        ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restores :meth:`state_dict` on resume (strict: the same names)."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> "Method":
        """Moves the buffers to the training device (``nn.Module.to``), once, before the first step."""
        ...


def frozen_networks(method: nn.Module) -> dict[str, nn.Module]:
    """The networks ``method`` runs but never trains, by name: its ``frozen_networks()`` if it has one (a
    distillation teacher), else none."""
    get = getattr(method, "frozen_networks", None)
    return dict(get()) if callable(get) else {}


def uses_sample_index(method: nn.Module) -> bool:
    """Whether ``method``'s collate takes ``(image, label, dataset index)`` samples (its ``sample_index``)."""
    return bool(getattr(method, "sample_index", False))


def checkpointed_networks(method: nn.Module, step: int) -> dict[str, nn.Module]:
    """The frozen networks whose weights a checkpoint after ``step`` optimizer steps holds, by name: the method's
    ``checkpointed_networks(step)`` if it has one (the Gram teacher once copied), else none."""
    get = getattr(method, "checkpointed_networks", None)
    return dict(get(step)) if callable(get) else {}


def before_step(method: nn.Module, step: int, teacher: nn.Module | None) -> None:
    """The method's ``before_step(step, teacher)`` before ``step``'s forward, if it has one."""
    hook = getattr(method, "before_step", None)
    if callable(hook):
        hook(step, teacher)


def student_units(network: nn.ModuleDict) -> dict[str, nn.ModuleDict]:
    """A student (or its EMA teacher) split into its students: ``""`` for the first (``network`` itself when it
    holds no further students, else its parts without them), then each further student by name."""
    if not isinstance(network, nn.ModuleDict) or FURTHER_STUDENTS not in network:
        return {"": network}
    further = network[FURTHER_STUDENTS]
    first = nn.ModuleDict({k: v for k, v in network.items() if k != FURTHER_STUDENTS})
    return {"": first, **{name: unit for name, unit in further.items()}}


def split_students(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`student_units` for a flat state dict: ``{"": the first student's entries, name: the entries under
    ``students.<name>.`` without that prefix}``."""
    units: dict[str, dict[str, Any]] = {"": {}}
    prefix = FURTHER_STUDENTS + "."
    for key, value in state_dict.items():
        if key.startswith(prefix):
            name, _, rest = key[len(prefix):].partition(".")
            units.setdefault(name, {})[rest] = value
        else:
            units[""][key] = value
    return units
