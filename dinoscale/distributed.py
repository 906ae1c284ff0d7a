"""Process-group helpers.

Every function here is an exact no-op (or returns the single-process answer) when
``torch.distributed`` is not initialised, so losses and the training loop can call them
unconditionally.

:func:`init_distributed` creates the process group from the launcher's environment
(torchrun, or ``srun`` under SLURM) or leaves the program single-process;
:func:`seed_everything` and :func:`destroy_distributed` complete the life cycle.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist


def is_enabled() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


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
    return torch.cat([gathered], dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (no gradient)."""
    if not is_enabled() or get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


# ---------------------------------------------------------------------------------------
# Process-group life cycle: init_distributed, seed_everything, destroy_distributed
# ---------------------------------------------------------------------------------------

#: Environment variable with the (short) timeout, in seconds, for all ranks to arrive at
#: the rendezvous and at :func:`monitored_barrier`.
ARRIVAL_TIMEOUT_ENV = "DINOSCALE_DIST_TIMEOUT"
DEFAULT_ARRIVAL_TIMEOUT_S = 300.0

# Ports derived from SLURM_JOB_ID fall in [15000, 30000): high enough to avoid registered
# services, below Linux's ephemeral range (32768-60999) so the kernel never hands the same
# port to an outgoing connection on the master node.
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 15000
# Slurm reserves step ids from 0xFFFFFFF0 up (batch script, extern container, salloc's
# interactive step); a task started by `srun` has a small integer SLURM_STEP_ID.
_SLURM_FIRST_SPECIAL_STEP_ID = 0xFFFFFFF0

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedEnvError(RuntimeError):
    """The launcher's environment is inconsistent (half-set, out of range, unparsable)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job, as read from the launcher's environment.

    ``source`` is ``"torchrun"``, ``"slurm"``, ``"single"`` (no process group) or
    ``"external"`` (a process group created by someone else before :func:`init_distributed`).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    source: str

    @property
    def is_distributed(self) -> bool:
        return self.source != "single"


_SINGLE = DistInfo(0, 1, 0, 1, None, None, "single")
_INFO: DistInfo | None = None  # set by init_distributed, cleared by destroy_distributed
# gloo group used by monitored_barrier when the default group is not gloo (NCCL cannot run
# monitored_barrier); None means "use the default group".
_MONITOR_GROUP: dist.ProcessGroup | None = None


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value is not None and value.strip() != "" else None


def _parse_int(env: Mapping[str, str], name: str, *, minimum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        raise DistributedEnvError(f"environment variable {name} is not set")
    try:
        value = int(raw)
    except ValueError:
        raise DistributedEnvError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedEnvError(f"{name}={value} must be >= {minimum}")
    return value


def _parse_port(env: Mapping[str, str], name: str) -> int:
    port = _parse_int(env, name, minimum=1)
    if port > 65535:
        raise DistributedEnvError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def _format_ranks(ranks: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (big jobs can miss hundreds of ranks)."""
    parts: list[str] = []
    start = prev = None
    for r in sorted(ranks):
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = r
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def _split_top_level_commas(text: str, what: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in {what} {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {what} {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {what} {text!r}")
    items.append("".join(current))
    return items


def _expand_bracket(spec: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for piece in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", piece)
        if m is None:
            raise ValueError(f"cannot parse range {piece!r} in SLURM node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {piece!r} in SLURM node list {nodelist!r}")
        # Slurm keeps the zero padding of the lower bound: node[08-10] -> node08 node09 node10.
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a compressed SLURM host list without calling ``scontrol``.

    Handles comma-separated items, bracketed ranges with zero padding and several bracket
    groups per item (expanded as a product), e.g. ``"node[01-03,07],gpu5"`` ->
    ``["node01", "node02", "node03", "node07", "gpu5"]`` and ``"r[1-2]n[1-2]"`` ->
    ``["r1n1", "r1n2", "r2n1", "r2n2"]``.
    """
    if not nodelist or not nodelist.strip():
        raise ValueError("empty SLURM node list")
    hosts: list[str] = []
    for item in _split_top_level_commas(nodelist.strip(), "SLURM node list"):
        if not item:
            raise ValueError(f"empty host name in SLURM node list {nodelist!r}")
        expanded = [""]
        for part in re.split(r"(\[[^\[\]]*\])", item):
            if part.startswith("["):
                choices = _expand_bracket(part[1:-1], nodelist)
            else:
                choices = [part]
            expanded = [prefix + c for prefix in expanded for c in choices]
        hosts.extend(expanded)
    return hosts


def expand_slurm_nodelist(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """All host names of a SLURM node list, via ``scontrol show hostnames`` when available
    (it knows every site-specific form), else via :func:`parse_slurm_nodelist`."""
    if use_scontrol and shutil.which("scontrol") is not None:
        try:
            result = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            hosts = result.stdout.split()
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass  # scontrol present but unusable (e.g. no slurm.conf in a container)
    return parse_slurm_nodelist(nodelist)


def _parse_tasks_per_node(spec: str, name: str) -> list[int]:
    """``"2(x3),1"`` -> ``[2, 2, 2, 1]`` (the SLURM_TASKS_PER_NODE format)."""
    counts: list[int] = []
    for piece in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", piece)
        if m is None:
            raise DistributedEnvError(
                f"{name}={spec!r}: cannot parse {piece!r} (expected forms like '4' or '2(x3),1')"
            )
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _is_srun_step(env: Mapping[str, str]) -> bool:
    """True for a task started by ``srun``; False for the batch shell of ``sbatch`` (no
    SLURM_STEP_ID) and for salloc's interactive step (a reserved step id)."""
    step = _get(env, "SLURM_STEP_ID") or _get(env, "SLURM_STEPID")
    if step is None or _get(env, "SLURM_PROCID") is None:
        return False
    try:
        return int(step) < _SLURM_FIRST_SPECIAL_STEP_ID
    except ValueError:
        return False  # names such as "batch", "extern", "interactive"


def _slurm_ntasks(env: Mapping[str, str]) -> int | None:
    # Inside a step, SLURM_STEP_NUM_TASKS is the step's own count; SLURM_NTASKS can be the
    # allocation's on some versions (srun -n1 inside an --ntasks=8 allocation).
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if _get(env, name) is not None:
            return _parse_int(env, name, minimum=1)
    return None


def _torchrun_info(env: Mapping[str, str]) -> DistInfo:
    present = [v for v in _TORCHRUN_VARS if _get(env, v) is not None]
    missing = [v for v in _TORCHRUN_VARS if _get(env, v) is None]
    if missing:
        raise DistributedEnvError(
            f"half-set torchrun environment: {', '.join(present)} set but {', '.join(missing)} "
            f"missing. Launch with torchrun, set all of {', '.join(_TORCHRUN_VARS)}, "
            "or unset them all for a single process."
        )
    world_size = _parse_int(env, "WORLD_SIZE", minimum=1)
    rank = _parse_int(env, "RANK", minimum=0)
    if rank >= world_size:
        raise DistributedEnvError(f"RANK={rank} must be smaller than WORLD_SIZE={world_size}")
    # torchrun always exports LOCAL_WORLD_SIZE; a hand-made launch without it is taken to be
    # a single node.
    if _get(env, "LOCAL_WORLD_SIZE") is not None:
        local_world_size = _parse_int(env, "LOCAL_WORLD_SIZE", minimum=1)
        if local_world_size > world_size:
            raise DistributedEnvError(
                f"LOCAL_WORLD_SIZE={local_world_size} exceeds WORLD_SIZE={world_size}"
            )
    else:
        local_world_size = world_size
    local_rank = _parse_int(env, "LOCAL_RANK", minimum=0)
    if local_rank >= local_world_size:
        raise DistributedEnvError(
            f"LOCAL_RANK={local_rank} must be smaller than LOCAL_WORLD_SIZE={local_world_size}"
            + ("" if _get(env, "LOCAL_WORLD_SIZE") else " (taken as WORLD_SIZE: LOCAL_WORLD_SIZE unset)")
        )
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=_get(env, "MASTER_ADDR"),
        master_port=_parse_port(env, "MASTER_PORT"),
        source="torchrun",
    )


def _slurm_info(env: Mapping[str, str], world_size: int, *, use_scontrol: bool) -> DistInfo:
    nodelist_var = next(
        (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if _get(env, v)),
        None,
    )
    tpn_var = next(
        (
            v
            for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
            if _get(env, v)
        ),
        None,
    )
    missing = [v for v in ("SLURM_PROCID", "SLURM_LOCALID") if _get(env, v) is None]
    if nodelist_var is None and _get(env, "MASTER_ADDR") is None:
        missing.append("SLURM_JOB_NODELIST (or MASTER_ADDR)")
    if tpn_var is None:
        missing.append("SLURM_TASKS_PER_NODE (or SLURM_NTASKS_PER_NODE)")
    if _get(env, "SLURM_JOB_ID") is None and _get(env, "MASTER_PORT") is None:
        missing.append("SLURM_JOB_ID (or MASTER_PORT)")
    if missing:
        raise DistributedEnvError(
            f"srun step with {world_size} tasks, but {', '.join(missing)} not set; "
            "cannot build the process group"
        )
    rank = _parse_int(env, "SLURM_PROCID", minimum=0)
    if rank >= world_size:
        raise DistributedEnvError(
            f"SLURM_PROCID={rank} must be smaller than the number of tasks ({world_size})"
        )
    counts = _parse_tasks_per_node(env[tpn_var], tpn_var)
    node_id = _parse_int(env, "SLURM_NODEID", minimum=0) if _get(env, "SLURM_NODEID") else 0
    if len(counts) == 1:
        local_world_size = counts[0]
    elif node_id < len(counts):
        local_world_size = counts[node_id]
    else:
        raise DistributedEnvError(
            f"SLURM_NODEID={node_id} but {tpn_var}={env[tpn_var]!r} lists only {len(counts)} nodes"
        )
    local_rank = _parse_int(env, "SLURM_LOCALID", minimum=0)
    if local_rank >= local_world_size:
        raise DistributedEnvError(
            f"SLURM_LOCALID={local_rank} must be smaller than the tasks on this node "
            f"({local_world_size}, from {tpn_var}={env[tpn_var]!r})"
        )
    # An explicit MASTER_ADDR/MASTER_PORT (exported in the sbatch script) wins over derivation.
    if _get(env, "MASTER_ADDR") is not None:
        master_addr = _get(env, "MASTER_ADDR")
    else:
        try:
            master_addr = expand_slurm_nodelist(env[nodelist_var], use_scontrol=use_scontrol)[0]
        except ValueError as e:
            raise DistributedEnvError(f"{nodelist_var}: {e}") from None
    if _get(env, "MASTER_PORT") is not None:
        master_port = _parse_port(env, "MASTER_PORT")
    else:
        job_id = _parse_int(env, "SLURM_JOB_ID", minimum=0)
        master_port = _SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )


def dist_info_from_env(env: Mapping[str, str] | None = None, *, use_scontrol: bool = True) -> DistInfo:
    """Read the job layout from ``env`` (default ``os.environ``) without touching the network.

    Precedence: torchrun variables (any of RANK, WORLD_SIZE, LOCAL_RANK set), then an ``srun``
    step with more than one task, else a single process. A plain ``sbatch`` or ``salloc``
    shell (no ``srun`` step, or one task) is a single process even if SLURM_NTASKS > 1.
    Raises :class:`DistributedEnvError` naming the variables of a half-set environment.
    """
    env = os.environ if env is None else env
    if any(_get(env, v) is not None for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _torchrun_info(env)
    if _is_srun_step(env):
        ntasks = _slurm_ntasks(env)
        if ntasks is None:
            raise DistributedEnvError(
                "srun step without SLURM_NTASKS / SLURM_STEP_NUM_TASKS; cannot size the job"
            )
        if ntasks > 1:
            return _slurm_info(env, ntasks, use_scontrol=use_scontrol)
        return _SINGLE
    if _get(env, "SLURM_JOB_ID") is None:
        stray = [v for v in ("MASTER_ADDR", "MASTER_PORT") if _get(env, v) is not None]
        if stray:
            raise DistributedEnvError(
                f"half-set environment: {', '.join(stray)} set but RANK and WORLD_SIZE are not. "
                "Set RANK, WORLD_SIZE, LOCAL_RANK (or use torchrun), or unset "
                f"{', '.join(stray)} for a single process."
            )
    return _SINGLE


def get_arrival_timeout_s() -> float:
    """The rendezvous / monitored-barrier timeout: ``$DINOSCALE_DIST_TIMEOUT`` or 300 s."""
    raw = _get(os.environ, ARRIVAL_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_ARRIVAL_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DistributedEnvError(f"{ARRIVAL_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise DistributedEnvError(f"{ARRIVAL_TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


def _open_store(info: DistInfo, arrival_s: float) -> dist.Store:
    # Under torchrun the elastic agent already serves a store at MASTER_ADDR:MASTER_PORT,
    # so every worker (rank 0 included) connects as a client.
    agent_serves = (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and os.environ.get("MASTER_ADDR") == info.master_addr
        and os.environ.get("MASTER_PORT") == str(info.master_port)
    )
    is_host = info.rank == 0 and not agent_serves
    try:
        # wait_for_workers=False: rank 0 must not block here, it counts arrivals itself below
        # so that it can name the ranks that never came.
        return dist.TCPStore(
            info.master_addr,
            info.master_port,
            info.world_size,
            is_host,
            timeout=timedelta(seconds=arrival_s),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except RuntimeError as e:
        where = f"{info.master_addr}:{info.master_port}"
        if is_host:
            raise RuntimeError(
                f"rank 0 could not host the rendezvous store on {where} ({e}); the port may be "
                "in use (set MASTER_PORT to another one)"
            ) from e
        raise RuntimeError(
            f"rank {info.rank} could not reach the rendezvous store at {where} within "
            f"{arrival_s:g} s ({e}): rank 0 never arrived, or MASTER_ADDR/MASTER_PORT is wrong"
        ) from e


def _wait_for_all_ranks(store: dist.Store, info: DistInfo, arrival_s: float) -> None:
    """Every rank checks in; rank 0 waits up to ``arrival_s`` and publishes the verdict."""
    prefix = f"dinoscale/arrival/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    keys = [f"{prefix}rank{r}" for r in range(info.world_size)]
    store.set(keys[info.rank], socket.gethostname())
    verdict_key = prefix + "verdict"
    if info.rank == 0:
        deadline = time.monotonic() + arrival_s
        while not store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r in range(info.world_size) if not store.check([keys[r]])]
                store.set(verdict_key, "missing:" + _format_ranks(missing))
                raise RuntimeError(
                    f"rank(s) {_format_ranks(missing)} of {info.world_size} did not arrive at the "
                    f"rendezvous ({info.master_addr}:{info.master_port}) within {arrival_s:g} s "
                    f"(the arrival timeout, ${ARRIVAL_TIMEOUT_ENV}); check that they were launched and did not "
                    "crash before init_distributed()"
                )
            time.sleep(0.05)
        store.set(verdict_key, "ok")
        return
    try:
        # Rank 0 decides within arrival_s of its own start; allow for a late start of rank 0.
        store.wait([verdict_key], timedelta(seconds=2 * arrival_s))
        verdict = store.get(verdict_key).decode()
    except RuntimeError as e:
        raise RuntimeError(
            f"rank {info.rank}: no word from rank 0 about the other ranks within "
            f"{2 * arrival_s:g} s ({e})"
        ) from e
    if verdict != "ok":
        raise RuntimeError(
            f"rank {info.rank}: rank 0 reports that rank(s) {verdict.split(':', 1)[1]} of "
            f"{info.world_size} did not arrive at the rendezvous within {arrival_s:g} s"
        )


def init_distributed(
    *, backend: str | None = None, timeout_s: float = 600, arrival_timeout_s: float | None = None
) -> DistInfo:
    """Create the default process group from torchrun or SLURM variables, or stay single-process.

    - backend: ``None`` picks NCCL when CUDA is available, else gloo. With CUDA the current
      device is set from the local rank (or to device 0 when each task sees a single GPU,
      as with ``srun --gpus-per-task=1``).
    - timeout_s: timeout of collectives (NCCL/gloo watchdog).
    - arrival_timeout_s: how long rank 0 waits for every rank at the rendezvous and at the
      following :func:`monitored_barrier`; default ``$DINOSCALE_DIST_TIMEOUT`` or 300 s. A
      rank that does not arrive makes init fail with a RuntimeError naming it, instead of a
      hang.

    Calling it again while the group exists returns the same :class:`DistInfo`.
    """
    global _INFO, _MONITOR_GROUP
    if is_enabled():
        if _INFO is not None:
            return _INFO
        return DistInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            master_addr=os.environ.get("MASTER_ADDR"),
            master_port=int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None,
            source="external",
        )
    info = dist_info_from_env()
    if not info.is_distributed:
        return info
    arrival_s = get_arrival_timeout_s() if arrival_timeout_s is None else float(arrival_timeout_s)
    if not arrival_s > 0:
        raise ValueError(f"arrival_timeout_s must be > 0 seconds, got {arrival_timeout_s}")

    has_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if has_cuda else "gloo")
    if "nccl" in backend and not has_cuda:
        raise RuntimeError(f"backend={backend!r} needs CUDA, but no CUDA device is available")
    device_id = None
    if has_cuda:
        n_devices = torch.cuda.device_count()
        if info.local_rank < n_devices:
            device_index = info.local_rank
        elif n_devices == 1:
            device_index = 0
        else:
            raise DistributedEnvError(
                f"local rank {info.local_rank} (LOCAL_RANK / SLURM_LOCALID) has no GPU: only "
                f"{n_devices} CUDA devices are visible to this process"
            )
        torch.cuda.set_device(device_index)
        device_id = torch.device("cuda", device_index)

    store = _open_store(info, arrival_s)
    _wait_for_all_ranks(store, info, arrival_s)
    # The arrival phase is over: from now on store operations may take as long as collectives.
    store.set_timeout(timedelta(seconds=timeout_s))
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device_id if "nccl" in backend else None,
    )
    _MONITOR_GROUP = None if "gloo" in backend else dist.new_group(backend="gloo")
    _INFO = info
    monitored_barrier(timeout_s=arrival_s)
    return info


def _monitor_group() -> dist.ProcessGroup | None:
    global _MONITOR_GROUP
    if _MONITOR_GROUP is None and "gloo" not in str(dist.get_backend()):
        # A group created outside init_distributed on NCCL: monitored_barrier needs gloo.
        # new_group is collective, which is fine here since every rank is entering a barrier.
        _MONITOR_GROUP = dist.new_group(backend="gloo")
    return _MONITOR_GROUP


def monitored_barrier(*, timeout_s: float | None = None) -> None:
    """A barrier that fails with a RuntimeError naming the ranks that did not arrive.

    Runs ``torch.distributed.monitored_barrier(wait_all_ranks=True)`` on a gloo group (a side
    group when the default backend is NCCL). No-op in a single process. ``timeout_s``
    defaults to ``$DINOSCALE_DIST_TIMEOUT`` or 300 s.
    """
    if not is_enabled() or get_world_size() == 1:
        return
    timeout = get_arrival_timeout_s() if timeout_s is None else float(timeout_s)
    try:
        dist.monitored_barrier(
            group=_monitor_group(), timeout=timedelta(seconds=timeout), wait_all_ranks=True
        )
    except RuntimeError as e:
        # Rank 0 gets "Ranks 1, 3 failed to pass monitoredBarrier ..."; other ranks only learn
        # that rank 0 did not release them.
        m = re.search(r"Ranks? ([\d,\s]+) failed to pass monitoredBarrier", str(e))
        if m is not None:
            missing = [int(r) for r in re.findall(r"\d+", m.group(1))]
            raise RuntimeError(
                f"rank(s) {_format_ranks(missing)} of {get_world_size()} did not reach the "
                f"barrier within {timeout:g} s (rank {get_rank()} waited); they crashed, hang, "
                f"or run different code. Original error: {e}"
            ) from e
        raise RuntimeError(
            f"rank {get_rank()}: barrier not passed within {timeout:g} s; rank 0's error names "
            f"the ranks that did not arrive. Original error: {e}"
        ) from e


def destroy_distributed() -> None:
    """Destroy the process group(s) created by :func:`init_distributed` (no-op otherwise)."""
    global _INFO, _MONITOR_GROUP
    if is_enabled():
        dist.destroy_process_group()  # also destroys the side gloo group
    _INFO = None
    _MONITOR_GROUP = None


def seed_everything(seed: int, *, per_rank: bool) -> int:
    """Seed Python, NumPy and torch (all devices); returns the seed actually used.

    ``per_rank=True`` adds the rank, for data augmentation (each rank draws different crops);
    ``per_rank=False`` gives every rank the same stream, for model initialisation (all ranks
    must start from the same weights). Call it after :func:`init_distributed`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    used = seed + (get_rank() if per_rank else 0)
    if used >= 2**32:
        raise ValueError(f"seed {used} (seed + rank) must be < 2**32 (NumPy's limit)")
    random.seed(used)
    np.random.seed(used)
    torch.manual_seed(used)  # also seeds every CUDA device
    return used


def find_free_port() -> int:
    """A TCP port that is free right now on this host (for local multi-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
