"""The EMA teacher: the one place where teacher weights are written.

    teacher <- m * teacher + (1 - m) * student        (for every parameter, m = the scheduled momentum)

Parameters are matched by name (ignoring wrapper components such as ``_orig_mod.``, see
:func:`dinoscale.parallel.strip_wrapper_prefixes`), so student and teacher may be wrapped differently, e.g. an
activation-checkpointed student and a plain teacher. Under FSDP2 both are sharded the same way and the update runs
on each rank's local shards (``DTensor.to_local()``), so no full parameter is ever gathered.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from dinoscale.parallel import strip_wrapper_prefixes

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed
    DTensor = None

__all__ = ["ema_update_", "init_teacher_from_student_"]


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    # Under no_grad, to_local() hands back the shard itself, so in-place ops on it update the parameter.
    return t.to_local() if _is_dtensor(t) else t


def _match(
    teacher_items: list[tuple[str, torch.Tensor]], student_items: list[tuple[str, torch.Tensor]], what: str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pair teacher and student tensors by canonical name, in the teacher's order; raise on any mismatch."""
    teacher_by_name = {strip_wrapper_prefixes(n): t for n, t in teacher_items}
    student_by_name = {strip_wrapper_prefixes(n): t for n, t in student_items}
    for side, items, by_name in (
        ("teacher", teacher_items, teacher_by_name),
        ("student", student_items, student_by_name),
    ):
        if len(by_name) != len(items):
            raise ValueError(f"two {side} {what} have the same name once wrapper components are removed")
    only_teacher = sorted(set(teacher_by_name) - set(student_by_name))
    only_student = sorted(set(student_by_name) - set(teacher_by_name))
    if only_teacher or only_student:
        raise ValueError(
            f"teacher and student {what} do not match: only in the teacher: {only_teacher[:5]}"
            f"{' ...' if len(only_teacher) > 5 else ''}; only in the student: {only_student[:5]}"
            f"{' ...' if len(only_student) > 5 else ''}"
        )
    pairs = []
    for name, t in teacher_by_name.items():
        s = student_by_name[name]
        if t.shape != s.shape:
            raise ValueError(f"{what[:-1]} '{name}': teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if _is_dtensor(t) != _is_dtensor(s):
            raise ValueError(
                f"{what[:-1]} '{name}' is a DTensor in the {'teacher' if _is_dtensor(t) else 'student'} only; "
                "shard teacher and student the same way"
            )
        if _is_dtensor(t) and (t.placements != s.placements or t.to_local().shape != s.to_local().shape):
            raise ValueError(
                f"{what[:-1]} '{name}' is sharded differently: teacher {t.placements} local "
                f"{tuple(t.to_local().shape)}, student {s.placements} local {tuple(s.to_local().shape)}"
            )
        if t.dtype != s.dtype or t.device != s.device:
            raise ValueError(
                f"{what[:-1]} '{name}': teacher is {t.dtype} on {t.device}, student is {s.dtype} on {s.device}"
            )
        pairs.append((name, t, s))
    return pairs


@dataclass
class _EmaPairs:
    teacher_ref: weakref.ref
    student_ref: weakref.ref
    teacher_params: list[torch.Tensor]
    student_params: list[torch.Tensor]
    is_dtensor: list[bool]
    student_first: torch.Tensor | None


# (id(teacher), id(student)) -> matched parameter lists; weak references guard against reused ids.
_EMA_CACHE: dict[tuple[int, int], _EmaPairs] = {}


def _ema_pairs(teacher: nn.Module, student: nn.Module) -> _EmaPairs:
    key = (id(teacher), id(student))
    cached = _EMA_CACHE.get(key)
    if cached is not None and cached.teacher_ref() is teacher and cached.student_ref() is student:
        # Cheap staleness check: wrapping with fully_shard after the first update replaces every parameter
        # (pairs are in the teacher's order, so the first one is the teacher's first parameter).
        teacher_first = next(iter(teacher.parameters()), None)
        student_first = next(iter(student.parameters()), None)
        teacher_same = not cached.teacher_params or teacher_first is cached.teacher_params[0]
        if teacher_same and student_first is cached.student_first:
            return cached
    pairs = _match(list(teacher.named_parameters()), list(student.named_parameters()), "parameters")
    entry = _EmaPairs(
        teacher_ref=weakref.ref(teacher),
        student_ref=weakref.ref(student),
        teacher_params=[t for _, t, _ in pairs],
        student_params=[s for _, _, s in pairs],
        is_dtensor=[_is_dtensor(t) for _, t, _ in pairs],
        student_first=next(iter(student.parameters()), None),
    )
    _EMA_CACHE[key] = entry
    # Drop the entry (and its references to the parameters) when either module is garbage-collected.
    weakref.finalize(teacher, _EMA_CACHE.pop, key, None)
    weakref.finalize(student, _EMA_CACHE.pop, key, None)
    return entry


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter, in place.

    ``momentum`` may be a 1-element tensor on the parameters' device (e.g. 1.0 for a skipped step, decided on the
    device), so that the update needs no host sync.

    The first call matches parameters by name and checks shapes, dtypes and sharding (raising ``ValueError`` on a
    mismatch); later calls reuse that pairing and cost one ``torch._foreach_lerp_`` over the local tensors.
    """
    if not isinstance(momentum, torch.Tensor) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
    pairs = _ema_pairs(teacher, student)
    if not pairs.teacher_params:
        return
    teacher_local = [p.to_local() if d else p for p, d in zip(pairs.teacher_params, pairs.is_dtensor)]
    student_local = [p.to_local() if d else p for p, d in zip(pairs.student_params, pairs.is_dtensor)]
    # lerp(t, s, w) = t + w * (s - t) = (1 - w) * t + w * s with w = 1 - m: one fused pass over the tensors.
    weight = 1.0 - momentum if isinstance(momentum, torch.Tensor) else 1.0 - float(momentum)
    torch._foreach_lerp_(teacher_local, student_local, weight)


@torch.no_grad()
def init_teacher_from_student_(teacher: nn.Module, student: nn.Module) -> None:
    """Copy every student parameter and buffer into the teacher (matched by name) and freeze the teacher.

    The teacher is built separately (e.g. without stochastic depth); this makes its weights identical to the
    student's, and sets ``requires_grad=False`` on all teacher parameters.
    """
    param_pairs = _match(list(teacher.named_parameters()), list(student.named_parameters()), "parameters")
    buffer_pairs = _match(list(teacher.named_buffers()), list(student.named_buffers()), "buffers")
    for _, t, s in param_pairs + buffer_pairs:
        _local(t).copy_(_local(s))
    for p in teacher.parameters():
        p.requires_grad_(False)
