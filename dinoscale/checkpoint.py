"""Checkpoints: one place for what a run saves, where, how it is checked, and how it comes back.

Layout of ``OUTPUT_DIR/checkpoints/step_000001250/``:
  ``.metadata`` + ``__*.distcp``  torch.distributed.checkpoint (DCP) of ``student``, ``teacher``, ``optimizer``,
                                  ``method`` (the loss centers) and ``networks`` (the method's frozen networks
                                  that are training state: a Gram teacher); sharded parameters are saved as
                                  shards and resharded on load, so a run may resume on a different number of ranks.
  ``rank_K.pt``                   per-rank RNG states (torch, numpy, python, CUDA) and the loader state of rank K,
                                  as tensors and plain Python values (loaded with ``weights_only=True``).
  ``trainer.json``                step, world size, consecutive bad steps, data position (the global step the
                                  data stream resumes at), the names under ``networks``, written by rank 0.
  ``manifest.json``               every other file of the checkpoint with its size in bytes, written last.

Saving is atomic: everything is written to ``step_X.tmp``, checked (every extent DCP's ``.metadata`` refers to
is on disk, every rank's file is there, the manifest is written) and only then renamed to ``step_X``, so a
crash while saving never damages an earlier checkpoint. A failed save (disk full, no permission) removes its
partial directory on every rank and raises :class:`CheckpointError` saying how much space it needed. The last
``keep`` checkpoints are kept.

Background saving (:class:`CheckpointWriter`, ``train.async_checkpoint``): the state is copied to fresh CPU memory
in the caller's thread (the only part that holds training up) and the same three phases run in a thread while
training goes on, their collectives on a gloo process group of their own. The rename and the pruning happen only
when the write is complete, one save is in flight at a time, and a failure is raised in the training thread.

Loading checks first (:func:`check_checkpoint`): :func:`latest_checkpoint` reports a damaged checkpoint (which
file, what is wrong) and returns the newest intact one. Checkpoints written before manifests existed are
checked against DCP's ``.metadata`` alone, and their numpy RNG state still loads.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import random
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from dinoscale import distributed

log = logging.getLogger("dinoscale.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"

# What a rank file written before RNG states were stored as tensors holds besides tensors and plain values:
# numpy's legacy RNG state tuple (a uint32 array). Allowed explicitly so that old checkpoints load weights-only.
_OLD_RANK_FILE_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, does not fit the model, or cannot be written."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed from .tmp, with DCP metadata and trainer.json), oldest first.

    Complete is not intact: :func:`check_checkpoint` looks at the files themselves.
    """
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir()
             if _STEP_DIR.match(path.name) and (path / ".metadata").exists() and (path / "trainer.json").exists()]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are reported (logged) and passed over.

    None when there is no checkpoint; :class:`CheckpointError` when there are some but none is intact, so a
    run never silently starts from scratch over its own checkpoints.
    """
    ckpts = list_checkpoints(output_dir)
    problems = []
    for path in reversed(ckpts):
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as exc:
            problems.append(str(exc))
            if distributed.get_rank() == 0:
                log.warning("%s; trying the checkpoint before it", exc)
    if problems:
        raise CheckpointError(f"none of the {len(ckpts)} checkpoints in {checkpoint_root(output_dir)} is intact:\n"
                              + "\n".join(problems)
                              + "\nMove them away to start afresh (or pass --no-resume / train.resume=false).")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent} is damaged: {path.name} is missing") from None
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or undecodable bytes
        raise CheckpointError(f"checkpoint {path.parent} is damaged: {path.name} cannot be read ({exc})") from exc


def _file_sizes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file() and f.name != MANIFEST}


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """Raise :class:`CheckpointError` naming the damaged file and what is wrong with it; else return
    ``trainer.json``'s content.

    Checks, without reading the tensors: the manifest's files are there with their recorded sizes (checkpoints
    written before manifests have none), DCP's ``.metadata`` reads and every extent it refers to lies inside its
    file, and the per-rank file of every rank that wrote the checkpoint is there.
    """
    path = Path(path)
    meta = _read_json(path / "trainer.json")
    if (path / MANIFEST).exists():
        recorded = _read_json(path / MANIFEST)["files"]
        for name, size in recorded.items():
            file = path / name
            if not file.exists():
                raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
            if file.stat().st_size != size:
                raise CheckpointError(f"checkpoint {path} is damaged: {name} has {file.stat().st_size} bytes, "
                                      f"{size} were written (truncated or overwritten)")
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is damaged: .metadata is missing") from None
    except Exception as exc:  # pickle raises many kinds on a damaged file
        raise CheckpointError(f"checkpoint {path} is damaged: .metadata cannot be read "
                              f"({type(exc).__name__}: {exc})") from exc
    needed: dict[str, int] = {}  # file -> end of the last extent .metadata places in it
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} (referenced by .metadata) is missing")
        if file.stat().st_size < end:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {file.stat().st_size} bytes but "
                                  f".metadata places data up to byte {end} (truncated)")
    for rank in range(int(meta.get("world_size", 1))):
        if not (path / f"rank_{rank}.pt").exists():
            raise CheckpointError(f"checkpoint {path} is damaged: rank_{rank}.pt is missing")
    return meta


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (so they load weights-only)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output, or the numpy-tuple form older checkpoints hold."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"]
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": np.asarray(key, dtype=np.uint32)}}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_rank_file(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals(_OLD_RANK_FILE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged zip raises RuntimeError, a foreign pickle UnpicklingError
            raise CheckpointError(f"checkpoint {path.parent} is damaged: {path.name} cannot be loaded "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def _app_state(student: nn.Module, teacher: nn.Module | None, optimizer, method: nn.Module,
               networks: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    # The torch.distributed.checkpoint.state_dict helpers give fully-qualified names for plain and FSDP2
    # modules alike, so the same code saves a single-process run and a sharded one.
    state = {
        "student": get_model_state_dict(student),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "method": method.state_dict(),  # the loss centers
    }
    if teacher is not None:  # methods without an EMA teacher (SimCLR, Barlow Twins, SimMIM) have none
        state["teacher"] = get_model_state_dict(teacher)
    if networks:  # the method's checkpointed frozen networks (a Gram teacher)
        state["networks"] = {name: get_model_state_dict(net) for name, net in networks.items()}
    return state


# DCP writes every state-dict entry as a torch.save record of its own: headers add about this much to each.
_DCP_BYTES_PER_ENTRY = 1600


def _bytes_to_write(obj: Any) -> int:
    """About what DCP writes for this rank's part of a nested state dict (its shard of a sharded tensor)."""
    if isinstance(obj, dict):
        return sum(_bytes_to_write(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes_to_write(v) for v in obj)
    if isinstance(obj, DTensor):
        obj = obj.to_local()
    size = obj.numel() * obj.element_size() if torch.is_tensor(obj) else 0
    return size + _DCP_BYTES_PER_ENTRY


def _root_cause(exc: BaseException) -> str:
    """One line: the error DCP wrapped (it reports each rank's as a traceback), else the error itself."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _all_gather(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """``value`` of every rank, in rank order, over ``group`` (None: the default group); also a barrier."""
    if not distributed.is_enabled() or distributed.get_world_size() == 1:
        return [value]
    gathered = [None] * distributed.get_world_size()
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _write_failure(tmp: Path, errors: list[str | None], *, needed: int) -> CheckpointError:
    """The error every rank raises when saving failed on any rank; rank 0 removes the partial directory."""
    if distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    causes = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
    root = tmp.parent
    existing = next(p for p in (root, *root.parents) if p.exists())  # root itself may be what could not be made
    free = shutil.disk_usage(existing).free
    verdict = " (the disk is full)" if free < needed else ""
    intact = [p.name for p in list_checkpoints(root.parent)]
    return CheckpointError(
        f"cannot write checkpoint {tmp.name[:-len('.tmp')]} to {root}: {causes}. It needs about "
        f"{_megabytes(needed)}; {_megabytes(free)} are free there{verdict}. The partial checkpoint was removed; "
        f"earlier checkpoints are untouched ({', '.join(intact) if intact else 'none yet'})."
    )


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    method: nn.Module,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    keep: int = 3,
    networks: dict[str, nn.Module] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically on all ranks; returns its directory.

    Three phases, each ending with all ranks exchanging their errors, so that a failure on any rank makes
    every rank raise the same :class:`CheckpointError` (nobody waits at a barrier for a rank that gave up):
    rank 0 makes the ``.tmp`` directory; every rank writes its DCP shards and its rank file; rank 0 writes
    ``trainer.json``, checks the whole directory, writes the manifest and renames it.

    ``networks``: the method's frozen networks whose weights are training state (a Gram teacher), saved under
    ``networks.<name>`` and listed in ``trainer.json`` (``"networks"``).
    """
    write = _checkpoint_write(output_dir, step, student=student, teacher=teacher, optimizer=optimizer,
                              method=method, trainer_state=trainer_state, rank_state=rank_state, keep=keep,
                              networks=networks, staged=False)
    return write(None)


def stage_to_cpu(obj: Any) -> Any:
    """A copy of a nested state dict whose tensors (and DTensors' local shards) are fresh CPU tensors; other
    values are deep-copied. Training may change the original in place afterwards without touching the copy."""
    if isinstance(obj, torch.Tensor):  # a DTensor too: .to() copies its local shard and keeps mesh and placements
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: stage_to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(stage_to_cpu(value) for value in obj)
    return copy.deepcopy(obj)


def _checkpoint_write(
    output_dir: str | Path,
    step: int,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    method: nn.Module,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any] | None,
    keep: int,
    networks: dict[str, nn.Module] | None,
    staged: bool,
) -> Callable[[dist.ProcessGroup | None], Path]:
    """Take everything checkpoint ``step`` holds now (in the caller's thread) and return the function that writes
    it (:func:`save_checkpoint`'s phases, their collectives over the given group; None: the default group).

    ``staged``: the tensors are copied to CPU memory first (:func:`stage_to_cpu`), so the write may run while
    training changes the live ones; otherwise the write must run before the next optimizer step.
    """
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    state = _app_state(student, teacher, optimizer, method, networks)
    if staged:
        state = stage_to_cpu(state)
    buffer = io.BytesIO()
    torch.save({"rng": rng_state(), **(rank_state or {})}, buffer)
    rank_bytes = buffer.getvalue()
    meta = json.dumps({"step": step, "world_size": world_size, **trainer_state, "networks": sorted(networks or {})},
                      indent=1)
    local_bytes = _bytes_to_write(state) + len(rank_bytes)

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier save
        tmp.mkdir(parents=True)

    def write_shards(group: dist.ProcessGroup | None) -> None:
        if group is None:
            dcp.save(state, checkpoint_id=str(tmp))
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=group)
        (tmp / f"rank_{rank}.pt").write_bytes(rank_bytes)

    def finish() -> None:
        (tmp / "trainer.json").write_text(meta)
        check_checkpoint(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"files": _file_sizes(tmp)}, indent=1))
        if final.exists():  # re-saving the same step (a final save right after a periodic one, or a damaged one)
            shutil.rmtree(final)
        tmp.rename(final)

    def write(group: dist.ProcessGroup | None) -> Path:
        phases = ((prepare, False), (lambda: write_shards(group), True), (finish, False))
        for phase, on_every_rank in phases:
            error = None
            if on_every_rank or rank == 0:
                try:
                    phase()
                except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
                    error = _root_cause(exc)
            reports = _all_gather((error, local_bytes), group)
            if any(e is not None for e, _ in reports):
                raise _write_failure(tmp, [e for e, _ in reports], needed=sum(n for _, n in reports))

        if rank == 0 and keep > 0:
            # Only checkpoints up to this step count: a damaged newer one (the run resumed before it) is replaced
            # when the run gets there again, and must not push out the intact ones.
            earlier = [p for p in list_checkpoints(output_dir) if _step_of(p) <= step]
            for old in earlier[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        if distributed.is_enabled() and world_size > 1:
            dist.barrier(group=group)
        return final

    return write


class CheckpointWriter:
    """Writes the checkpoints of a run: in the caller's thread, or (``background=True``) staged to CPU memory and
    written by a thread while the next steps run.

    Background saving, per save: the previous save is waited for first (one in flight, so at most one staged
    copy of the state exists besides the live one); the state is copied to CPU memory (:func:`stage_to_cpu`, the
    only part training waits for); a thread runs :func:`save_checkpoint`'s three phases on that copy, with its
    collectives over a gloo process group of its own (created here, collectively, when there are several
    processes), so they never interleave with training's collectives. The checkpoint becomes visible (the rename
    of ``step_X.tmp``) and old ones are pruned only after every rank's write finished.

    A failed background write is raised in the training thread by :meth:`poll` (at the next log step; a
    collective agreement, so every rank raises together), by the next :meth:`save` or by :meth:`wait`; its
    partial directory was removed as in a synchronous save. Every rank must construct it and call
    :meth:`save`, :meth:`poll` and :meth:`wait` at the same steps.
    """

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self._group = None
        if background and distributed.is_enabled() and distributed.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._step: int | None = None
        self._result: Path | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        """A background save was started and not yet waited for (it may have finished)."""
        return self._thread is not None

    def save(self, output_dir: str | Path, step: int, **parts: Any) -> Path | None:
        """Save checkpoint ``step`` (``parts``: :func:`save_checkpoint`'s keyword arguments). Returns its directory
        when written in the caller's thread, None when it is being written in the background."""
        self.wait()
        write = _checkpoint_write(output_dir, step, staged=self.background,
                                  **{"rank_state": None, "keep": 3, "networks": None, **parts})
        if not self.background:
            return write(None)
        self._step, self._result, self._error = step, None, None
        # Not a daemon: an interpreter that exits (after a fatal error) lets the write finish (lifecycle.teardown
        # bounds the wait); a checkpoint cut short stays a .tmp directory, which is never loaded.
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"dinoscale-checkpoint-{step}")
        self._thread.start()
        return None

    def _run(self, write: Callable[[dist.ProcessGroup | None], Path]) -> None:
        try:
            self._result = write(self._group)
        except BaseException as exc:  # handed to the training thread
            self._error = exc

    def poll(self, device: torch.device, *, log_step: bool) -> None:
        """Raise the error of a failed background save. In one process at every call; with several only at log
        steps, where the ranks agree with one small all-reduce (only while a save is in flight), so that all of
        them raise together. A save that finished on every rank is collected here (no more all-reduces)."""
        if self._thread is None:
            return
        if distributed.get_world_size() == 1:
            if not self._thread.is_alive():
                self.wait()
            return
        if not log_step:
            return
        running = self._thread.is_alive()
        failed = not running and self._error is not None  # set before the thread ends
        flags = torch.tensor([float(failed), float(running)], device=device)
        n_failed, n_running = distributed.all_reduce_sum_(flags).tolist()
        if n_failed or not n_running:
            self.wait()
            if n_failed:  # this rank's write succeeded, another's did not
                raise CheckpointError(f"checkpoint step_{self._step:09d} failed on another rank (see its log)")

    def wait(self) -> Path | None:
        """Wait for the save in flight, if any; raise its error. Returns its directory (None when there was none)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the background write of checkpoint step_{self._step:09d} failed: "
                                  f"{type(error).__name__}: {error}") from error
        return self._result

    def close(self, timeout: float | None = None) -> None:
        """Wait for the save in flight (its error is raised), then release the process group. With ``timeout``, a
        save still running after that many seconds is left to finish on its own (with its process group): a
        failed run does not wait on a peer that may never answer, and a write cut short stays a ``.tmp``."""
        if self._thread is not None and timeout is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("checkpoint step_%09d is still being written after %g s; not waiting for it",
                            self._step, timeout)
                return
        try:
            self.wait()
        finally:
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None


def load_checkpoint(
    path: str | Path,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    method: nn.Module,
    networks: Callable[[int], dict[str, nn.Module]] | None = None,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into the given (possibly sharded) modules and optimizer, in place.

    ``networks(step)`` names the frozen networks a checkpoint of ``step`` must hold (a Gram teacher once copied);
    they are loaded too, and a checkpoint without one of them is refused. Other networks it holds are ignored.

    Returns ``trainer.json``'s content, with ``rank_state`` (this rank's RNG and loader state) added when the
    checkpoint was written by the same world size (otherwise RNG streams cannot be matched rank to rank and
    the caller re-seeds). Raises :class:`CheckpointError` naming the damaged file when it is damaged.
    """
    path = Path(path)
    meta = check_checkpoint(path)
    needed = networks(int(meta["step"])) if networks is not None else {}
    missing = sorted(set(needed) - set(meta.get("networks", [])))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} (step {meta['step']}) holds no {', '.join(missing)}, which this run needs from "
            f"that step on. For a Gram stage resumed from a checkpoint, set gram.it_load_ema_teacher to the "
            f"checkpoint's step (or later), so that the Gram teacher is copied from its EMA teacher."
        )
    state = _app_state(student, teacher, optimizer, method, needed)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"cannot load checkpoint {path}: {_root_cause(exc)}\n"
            "The checkpoint is damaged or was written by a different model/config. Delete it to resume from "
            "the previous one, or start a new output_dir."
        ) from exc
    set_model_state_dict(student, state["student"])
    if teacher is not None:
        set_model_state_dict(teacher, state["teacher"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    method.load_state_dict(state["method"])
    for name, network in needed.items():
        set_model_state_dict(network, state["networks"][name])

    if meta.get("world_size") == distributed.get_world_size():
        meta["rank_state"] = _load_rank_file(path / f"rank_{distributed.get_rank()}.pt")
    return meta


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; every rank must call it, rank 0 receives the tensors."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def save_backbone(state_dict: dict[str, torch.Tensor], out_prefix: str | Path) -> list[Path]:
    """Save a backbone state dict in the official DINOv2 layout as ``PREFIX.pth`` and ``PREFIX.safetensors``.

    The ``.pth`` is a plain ``{name: tensor}`` dict (``torch.load`` + ``load_state_dict(strict=True)`` works).
    """
    from safetensors.torch import save_file

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    pth, st = out_prefix.with_suffix(".pth"), out_prefix.with_suffix(".safetensors")
    torch.save(tensors, pth)
    save_file(tensors, str(st))
    return [pth, st]


def read_dcp_checkpoint(path: str | Path) -> dict[str, Any]:
    """The tensors of a DCP checkpoint as one nested dict on CPU, read in this process (no process group).

    Sharded tensors come back whole. Non-tensor entries (optimizer hyper-parameters, ...) are stored pickled;
    they are left out, so nothing but DCP's own metadata file is unpickled. Lists come back as dicts keyed
    by index.
    """
    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint directory (no .metadata)")
    try:
        reader = dcp.FileSystemReader(str(path))
        metadata = reader.read_metadata()
        flat = {
            key: torch.empty(md.size, dtype=md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(flat, storage_reader=reader, no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    nested: dict[Any, Any] = {}
    for key, tensor in flat.items():
        *parents, leaf = (metadata.planner_data or {}).get(key, (key,))
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return nested


def export_from_checkpoint(path: str | Path, out_prefix: str | Path, *, heads: bool = False) -> list[Path]:
    """A (sharded) training checkpoint -> its backbone in the official layout (+ heads if asked).

    The teacher's backbone when the method has an EMA teacher, else the student's.
    """
    state = read_dcp_checkpoint(path)
    network = state.get("teacher") or state.get("student") or {}
    backbone = {k[len("backbone.") :]: v for k, v in network.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(f"{path} holds no backbone (top-level keys: {sorted(state)})")
    written = save_backbone(backbone, out_prefix)
    if heads:
        head_sd = {k: v for k, v in network.items() if not k.startswith("backbone.")}
        written += save_backbone(head_sd, Path(str(out_prefix) + "_heads"))
    return written
