"""Checkpoints: one place for what a run saves, where, and how it comes back.

Layout of ``OUTPUT_DIR/checkpoints/step_000001250/``:
  ``.metadata`` + ``__*.distcp``  torch.distributed.checkpoint (DCP) of ``student``, ``teacher``, ``optimizer`` and
                                  ``method`` (the loss centers); sharded parameters are saved as shards and
                                  resharded on load, so a run may resume on a different number of ranks.
  ``rank_K.pt``                   per-rank RNG states (torch, numpy, python, CUDA) and the loader state of rank K.
  ``trainer.json``                step, world size, consecutive bad steps, data position (the global step the
                                  data stream resumes at), written by rank 0.

Saving is atomic: everything is written to ``step_X.tmp`` and renamed to ``step_X`` only when complete, so
a crash while saving never damages the last good checkpoint. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinoscale import distributed

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed from .tmp, with DCP metadata and trainer.json), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / ".metadata").exists() and (path / "trainer.json").exists():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _app_state(student: nn.Module, teacher: nn.Module | None, optimizer, method: nn.Module) -> dict[str, Any]:
    # The torch.distributed.checkpoint.state_dict helpers give fully-qualified names for plain and FSDP2
    # modules alike, so the same code saves a single-process run and a sharded one.
    state = {
        "student": get_model_state_dict(student),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "method": method.state_dict(),  # the loss centers
    }
    if teacher is not None:  # methods without an EMA teacher (SimCLR, Barlow Twins, SimMIM) have none
        state["teacher"] = get_model_state_dict(teacher)
    return state


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
) -> Path:
    """Write checkpoint ``step`` atomically on all ranks; returns its directory."""
    rank = distributed.get_rank()
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier save
        tmp.mkdir(parents=True)
    distributed.barrier()

    dcp.save(_app_state(student, teacher, optimizer, method), checkpoint_id=str(tmp))
    per_rank = {"rng": rng_state(), **(rank_state or {})}
    torch.save(per_rank, tmp / f"rank_{rank}.pt")
    distributed.barrier()

    if rank == 0:
        meta = {"step": step, "world_size": distributed.get_world_size(), **trainer_state}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # re-saving the same step (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    method: nn.Module,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into the given (possibly sharded) modules and optimizer, in place.

    Returns ``trainer.json``'s content, with ``rank_state`` (this rank's RNG and loader state) added when the
    checkpoint was written by the same world size (otherwise RNG streams cannot be matched rank to rank and
    the caller re-seeds).
    """
    path = Path(path)
    meta_file = path / "trainer.json"
    if not (path / ".metadata").exists() or not meta_file.exists():
        raise CheckpointError(f"{path} is not a complete dinoscale checkpoint (.metadata or trainer.json missing)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {meta_file}: {exc}") from exc

    state = _app_state(student, teacher, optimizer, method)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises several kinds (CheckpointException, RuntimeError, OSError)
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(exc).__name__}: {str(exc)[:2000]}\n"
            "The checkpoint is damaged or was written by a different model/config. Delete it to resume from "
            "the previous one, or start a new output_dir."
        ) from exc
    set_model_state_dict(student, state["student"])
    if teacher is not None:
        set_model_state_dict(teacher, state["teacher"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    method.load_state_dict(state["method"])

    rank_file = path / f"rank_{distributed.get_rank()}.pt"
    if meta.get("world_size") == distributed.get_world_size() and rank_file.exists():
        meta["rank_state"] = torch.load(rank_file, weights_only=False)
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
