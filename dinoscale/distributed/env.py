"""The launcher's environment as a plain record: torchrun and SLURM variables, node lists, the job's port.

:func:`dist_info_from_env` reads where this process sits in the job (rank, world size, local rank,
rendezvous address and port) from torchrun's variables or an ``srun`` step's, without touching the
network; a half-set environment raises :class:`DistributedEnvError` naming the variables.
:func:`master_port_for_job` is the one job-id-to-port rule, used both here (``srun``) and by
:mod:`dinoscale.launch` (submitit).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

#: Environment variable with the (short) timeout, in seconds, for all ranks to arrive at
#: the rendezvous and at :func:`dinoscale.distributed.init.monitored_barrier`.
ARRIVAL_TIMEOUT_ENV = "DINOSCALE_DIST_TIMEOUT"
DEFAULT_ARRIVAL_TIMEOUT_S = 300.0

# Ports derived from a job id fall in [15000, 30000): high enough to avoid registered
# services, below Linux's ephemeral range (32768-60999) so the kernel never hands the same
# port to an outgoing connection on the master node.
_JOB_PORT_BASE = 15000
_JOB_PORT_SPAN = 15000
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
    ``"external"`` (a process group created by someone else before
    :func:`dinoscale.distributed.init.init_distributed`).
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
        master_port = master_port_for_job(_parse_int(env, "SLURM_JOB_ID", minimum=0))
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



def master_port_for_job(job_id: int | str) -> int:
    """The rendezvous port of a job, derived from its id: the same on every task, with no communication.

    Only the digits count, so submitit's array-task ids (``"1234_5"``) work too. The port lies in
    [15000, 30000); two jobs sharing a node get different ports unless their ids agree modulo 15000.
    """
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return _JOB_PORT_BASE + int(digits) % _JOB_PORT_SPAN
