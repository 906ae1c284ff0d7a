"""dinoscale.checkpoint on tiny modules (single process): what is written, how damage is found, what loads."""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from dinoscale import checkpoint
from dinoscale.checkpoint import CheckpointError


class Centers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("center", torch.zeros(4))


def build(seed: int = 0):
    torch.manual_seed(seed)
    student = nn.ModuleDict({"backbone": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    teacher = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
    loss = student["head"](student["backbone"](torch.randn(3, 4))).sum()
    loss.backward()
    optimizer.step()
    method = Centers()
    method.center += seed + 1
    return dict(student=student, teacher=teacher, optimizer=optimizer, method=method)


def save(out, step, parts, keep=3):
    return checkpoint.save_checkpoint(out, step, trainer_state={"consecutive_bad_steps": 0}, keep=keep, **parts)


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_save_writes_a_manifest_and_loads_back_weights_state_and_rng(tmp_path):
    parts = build(seed=1)
    path = save(tmp_path, 5, parts)
    assert path.name == "step_000000005" and not list(checkpoint.checkpoint_root(tmp_path).glob("*.tmp"))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    assert set(manifest) == {".metadata", "__0_0.distcp", "rank_0.pt", "trainer.json"}
    assert all(manifest[name] == (path / name).stat().st_size for name in manifest)
    expected_draws = draws()  # what the RNGs give right after the save

    fresh = build(seed=2)
    meta = checkpoint.load_checkpoint(path, **fresh)
    assert meta["step"] == 5 and meta["world_size"] == 1
    for name in ("student", "teacher"):
        for key, value in parts[name].state_dict().items():
            assert torch.equal(fresh[name].state_dict()[key], value), (name, key)
    assert torch.equal(fresh["method"].center, parts["method"].center)
    assert fresh["optimizer"].state_dict()["state"][0]["exp_avg"].equal(
        parts["optimizer"].state_dict()["state"][0]["exp_avg"])
    draws()  # move every RNG on, then restore the saved states
    checkpoint.set_rng_state(meta["rank_state"]["rng"])
    assert draws() == expected_draws


def test_rank_file_loads_weights_only_without_extra_globals(tmp_path):
    path = save(tmp_path, 1, build())
    state = torch.load(path / "rank_0.pt", weights_only=True)
    assert set(state["rng"]) >= {"torch", "numpy", "python"}


def test_old_rank_file_with_numpy_state_still_loads(tmp_path):
    # Before RNG states were stored as tensors, rank files held numpy's legacy state tuple (an ndarray) and
    # checkpoints had no manifest.
    path = save(tmp_path, 1, build())
    np.random.seed(7)
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = np.random.rand(3).tolist()
    torch.save({"rng": old_rng}, path / "rank_0.pt")
    (path / checkpoint.MANIFEST).unlink()
    assert checkpoint.latest_checkpoint(tmp_path) == path
    meta = checkpoint.load_checkpoint(path, **build())
    np.random.rand(5)
    checkpoint.set_rng_state(meta["rank_state"]["rng"])
    assert np.random.rand(3).tolist() == expected


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated shard": (lambda p: truncate(p / "__0_0.distcp"), "__0_0.distcp has"),
    "missing shard": (lambda p: (p / "__0_0.distcp").unlink(), "__0_0.distcp .*missing"),
    "missing rank file": (lambda p: (p / "rank_0.pt").unlink(), "rank_0.pt is missing"),
    "truncated metadata": (lambda p: truncate(p / ".metadata"), r"\.metadata (has|cannot be read)"),
    "garbled trainer.json": (lambda p: (p / "trainer.json").write_text("{"), "trainer.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog, damage, with_manifest):
    parts = build()
    older = save(tmp_path, 2, parts)
    newest = save(tmp_path, 4, parts)
    if not with_manifest:  # checkpoints written before manifests: .metadata's extents are the reference
        for path in (older, newest):
            (path / checkpoint.MANIFEST).unlink()
    apply, expected = DAMAGE[damage]
    apply(newest)
    with caplog.at_level(logging.WARNING, logger="dinoscale.checkpoint"):
        assert checkpoint.latest_checkpoint(tmp_path) == older
    assert str(newest) in caplog.text and re.search(expected, caplog.text), caplog.text
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load_checkpoint(newest, **build())
    assert checkpoint.load_checkpoint(older, **build())["step"] == 2


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    path = save(tmp_path, 3, build())
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints .* is intact"):
        checkpoint.latest_checkpoint(tmp_path)
    assert checkpoint.latest_checkpoint(tmp_path / "elsewhere") is None


def test_failed_write_removes_its_partial_directory_and_says_what_it_needed(tmp_path, monkeypatch):
    parts = build()
    previous = save(tmp_path, 2, parts)
    real_save = checkpoint.dcp.save

    def disk_full(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # the shards are on disk, then the device fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.dcp, "save", disk_full)
    with pytest.raises(CheckpointError) as err:
        save(tmp_path, 4, parts)
    message = str(err.value)
    assert "step_000000004" in message and "unexpected pos" in message and "needs about" in message
    assert "step_000000002" in message  # the earlier checkpoints are named as untouched
    assert sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()) == ["step_000000002"]
    assert checkpoint.latest_checkpoint(tmp_path) == previous


def test_pruning_counts_only_checkpoints_up_to_the_saved_step(tmp_path):
    # A run that resumed before a damaged newer checkpoint must not lose its intact ones to the damaged one.
    parts = build()
    save(tmp_path, 2, parts, keep=2)
    damaged = save(tmp_path, 4, parts, keep=2)
    (damaged / "rank_0.pt").unlink()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000002"
    save(tmp_path, 3, parts, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000003", "step_000000004"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000003"
    save(tmp_path, 4, parts, keep=1)  # the run gets there again: the damaged one is replaced
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000004"]
    checkpoint.check_checkpoint(tmp_path / "checkpoints" / "step_000000004")


def test_background_save_writes_the_state_of_its_step_while_training_changes_it(tmp_path, monkeypatch):
    parts = build(seed=1)
    expected = {k: v.clone() for k, v in parts["student"].state_dict().items()}
    expected_avg = parts["optimizer"].state_dict()["state"][0]["exp_avg"].clone()
    real_save, started, release = checkpoint.dcp.save, threading.Event(), threading.Event()

    def held_save(state, *, checkpoint_id, **kwargs):  # the write waits until the training thread moved on
        started.set()
        assert release.wait(30)
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(checkpoint.dcp, "save", held_save)
    writer = checkpoint.CheckpointWriter(background=True)
    assert writer.save(tmp_path, 5, trainer_state={"consecutive_bad_steps": 0}, **parts) is None
    assert started.wait(30) and writer.in_flight
    assert not (checkpoint.checkpoint_root(tmp_path) / "step_000000005").exists()  # not visible before complete
    with torch.no_grad():  # the next steps change the live tensors in place
        for p in parts["student"].parameters():
            p.add_(1.0)
        parts["optimizer"].state_dict()["state"][0]["exp_avg"].add_(1.0)
    release.set()
    path = writer.wait()
    assert path.name == "step_000000005" and not writer.in_flight
    fresh = build(seed=2)
    checkpoint.load_checkpoint(path, **fresh)
    assert all(torch.equal(fresh["student"].state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(fresh["optimizer"].state_dict()["state"][0]["exp_avg"], expected_avg)
    writer.close()


def test_an_unexpected_background_error_is_raised_as_a_checkpoint_error(tmp_path, monkeypatch):
    parts = build()
    monkeypatch.setattr(checkpoint, "_all_gather", lambda value, group=None: 1 / 0)  # outside the phases' handling
    writer = checkpoint.CheckpointWriter(background=True)
    writer.save(tmp_path, 3, trainer_state={}, **parts)
    with pytest.raises(CheckpointError, match="background write of checkpoint step_000000003 failed: "
                                              "ZeroDivisionError") as err:
        writer.wait()
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert writer.wait() is None  # raised once, then nothing is in flight
    assert checkpoint.list_checkpoints(tmp_path) == []


def _two_rank_worker(rank, port, out_dir, fail_on_rank, background=False):
    import os
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    torch.set_num_threads(1)
    from dinoscale import distributed

    distributed.init_distributed()
    outcome = {}
    try:
        parts = build()
        writer = checkpoint.CheckpointWriter(background=background)  # background: collectives on a gloo group
        writer.save(out_dir, 2, trainer_state={"consecutive_bad_steps": 0}, **parts)
        writer.wait()
        if rank == fail_on_rank:  # only this rank's own file cannot be written (its disk, its permissions)
            def no_space(self, data):
                raise OSError(28, "No space left on device", str(self))
            Path.write_bytes = no_space
        try:
            writer.save(out_dir, 4, trainer_state={"consecutive_bad_steps": 0}, **parts)
            writer.wait()
            outcome["saved"] = True
        except CheckpointError as exc:
            outcome["error"] = str(exc)
        writer.close()
    finally:
        Path(out_dir, f"outcome{rank}.json").write_text(json.dumps(outcome))
        distributed.destroy_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path, background):
    import torch.multiprocessing as mp

    from dinoscale.distributed import find_free_port

    started = time.monotonic()
    mp.spawn(_two_rank_worker, args=(find_free_port(), str(tmp_path), 1, background), nprocs=2)
    assert time.monotonic() - started < 120  # nobody waited for the rank that gave up
    outcomes = [json.loads((tmp_path / f"outcome{r}.json").read_text()) for r in range(2)]
    for outcome in outcomes:
        assert "rank 1: OSError: [Errno 28] No space left on device" in outcome["error"], outcomes
        assert "rank 0:" not in outcome["error"] and "needs about" in outcome["error"]
    assert sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()) == ["step_000000002"]
    manifest = json.loads((tmp_path / "checkpoints" / "step_000000002" / checkpoint.MANIFEST).read_text())["files"]
    assert {"rank_0.pt", "rank_1.pt", "__0_0.distcp", "__1_0.distcp"} <= set(manifest)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000002"
