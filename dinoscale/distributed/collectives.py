"""Collectives that work with or without a process group.

Every function here is an exact no-op (or returns the single-process answer) when
``torch.distributed`` is not initialised, so losses and the training loop can call them
unconditionally. Creating the group is :mod:`dinoscale.distributed.init`'s job.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist


# Set by hide_process_group(): every function here then answers as in a single process.
_HIDDEN = False


def is_enabled() -> bool:
    """True when a default process group exists (and :func:`hide_process_group` is not in effect)."""
    return not _HIDDEN and dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def hide_process_group() -> Iterator[None]:
    """Within the block every collective here acts as in a single process: rank 0 of 1, no communication.

    For work that one rank may do alone through code that holds collectives, e.g. tracing a training step
    to count its FLOPs (which a JIT trace could not record anyway).
    """
    global _HIDDEN
    previous, _HIDDEN = _HIDDEN, True
    try:
        yield
    finally:
        _HIDDEN = previous


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_enabled() and get_world_size() > 1:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no gradient); returns it for chaining."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the autograd graph.

    The backward pass sums the incoming gradients over ranks and hands each rank the slice
    of its own input, so a loss computed on the gathered tensor gets the same gradient as
    the single-process loss on the full batch (after the usual data-parallel averaging).
    All ranks must pass tensors of the same shape.
    """
    if not is_enabled() or get_world_size() == 1:
        return tensor
    # The functional collective, not torch.distributed.nn.functional.all_gather: after a backward
    # through the latter, about half of all gloo processes aborted at interpreter exit
    # ("terminate called without an active exception", SIGABRT) even after
    # destroy_process_group. Its backward is a sum reduce-scatter, the same gradient.
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd  # torch < 2.14
    gathered = gather(tensor.contiguous(), 0, dist.group.WORLD)
    # The result is an AsyncCollectiveTensor that waits on first use; any non-view op turns it into a plain
    # tensor (autograd intact), so callers never hold the subclass (torch.load refuses it, for one).
    out = torch.cat([gathered], dim=0)
    if out.requires_grad:
        # Before torch 2.14 the backward reduce-scatters the incoming gradient as it comes, and gloo refuses a
        # non-contiguous one (e.g. the expanded gradient of a sum over the batch).
        out.register_hook(torch.Tensor.contiguous)
    return out


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (no gradient)."""
    if not is_enabled() or get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)
