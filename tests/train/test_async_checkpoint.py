"""train.async_checkpoint on the tiny run (CPU, one process): background saves write the same bytes as
synchronous ones, are complete when train() returns, never overlap, and a failed background write stops the run
with its error and leaves no checkpoint half visible."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from dinoscale import checkpoint
from dinoscale.checkpoint import CheckpointError
from dinoscale.config import load_config
from dinoscale.train import loop
from tests.train.test_loop import TINY, assert_same_run, rows, run

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

SYNC, ASYNC = "train.async_checkpoint=false", "train.async_checkpoint=true"


def names(out_dir):
    return sorted(p.name for p in checkpoint.checkpoint_root(out_dir).iterdir())


def test_async_and_sync_checkpoints_are_bitwise_identical_and_resume_alike(tmp_path):
    sync, background, resumed = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    run(sync, SYNC, "train.max_steps=4", "train.checkpoint_every=2")
    run(background, ASYNC, "train.max_steps=4", "train.checkpoint_every=2")
    assert names(sync) == names(background) == ["step_000000002", "step_000000004"]
    for name in names(sync):
        a, b = checkpoint.checkpoint_root(sync) / name, checkpoint.checkpoint_root(background) / name
        # every file byte for byte, except DCP's .metadata, which records the directory it was written to (and
        # so has another size in the manifest): there the layout of every tensor is compared
        files = sorted(f.name for f in a.iterdir())
        assert files == sorted(f.name for f in b.iterdir())
        for file in files:
            if file not in (".metadata", checkpoint.MANIFEST):
                assert (a / file).read_bytes() == (b / file).read_bytes(), (name, file)
        ma, mb = (json.loads((d / checkpoint.MANIFEST).read_text())["files"] for d in (a, b))
        assert {k: v for k, v in ma.items() if k != ".metadata"} == {k: v for k, v in mb.items() if k != ".metadata"}
        da, db = (FileSystemReader(str(d)).read_metadata() for d in (a, b))
        assert da.state_dict_metadata == db.state_dict_metadata and da.storage_data == db.storage_data
        ta, tb = checkpoint.read_dcp_checkpoint(a), checkpoint.read_dcp_checkpoint(b)

        def leaves(tree, prefix=""):
            for key, value in tree.items():
                yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]

        la, lb = dict(leaves(ta)), dict(leaves(tb))
        assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    # a run stopped at step 2 and resumed, both with background saves, continues as the synchronous run went
    run(resumed, ASYNC, "train.max_steps=2", "train.checkpoint_every=2")
    run(resumed, ASYNC, "train.max_steps=4", "train.checkpoint_every=2")
    assert_same_run(sync, resumed, 4)


def slow_dcp_save(monkeypatch, seconds):
    """dcp.save that takes ``seconds`` longer; records the threads it ran in and how many ran at once."""
    real_save = checkpoint.dcp.save
    record = {"threads": [], "running": 0, "max_running": 0}
    lock = threading.Lock()

    def save(state, *, checkpoint_id, **kwargs):
        with lock:
            record["running"] += 1
            record["max_running"] = max(record["max_running"], record["running"])
            record["threads"].append(threading.current_thread())
        try:
            time.sleep(seconds)
            return real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        finally:
            with lock:
                record["running"] -= 1

    monkeypatch.setattr(checkpoint.dcp, "save", save)
    return record


def test_saves_run_in_the_background_one_at_a_time_and_the_last_is_complete_on_return(tmp_path, monkeypatch):
    record = slow_dcp_save(monkeypatch, 0.5)  # longer than a tiny step: every save is still writing at the next
    _, result = run(tmp_path, ASYNC, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    assert result.status == "finished" and result.step == 4
    assert len(record["threads"]) == 4 and threading.main_thread() not in record["threads"]
    assert record["max_running"] == 1
    assert not any(t.name.startswith("dinoscale-checkpoint") for t in threading.enumerate())
    assert names(tmp_path) == ["step_000000003", "step_000000004"]  # pruned after each completed write
    checkpoint.check_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000004"


def test_a_stop_request_returns_only_after_its_checkpoint_is_written(tmp_path, monkeypatch):
    slow_dcp_save(monkeypatch, 0.5)
    calls = {"n": 0}

    def stop_at_three():
        calls["n"] += 1
        return calls["n"] >= 3

    cfg = load_config("quickstart", TINY + [f"train.output_dir={tmp_path}", ASYNC, "train.max_steps=10",
                                           "train.checkpoint_every=100"])
    result = loop.train(cfg, stop_requested=stop_at_three)
    assert result.status == "preempted" and result.step == 3
    assert names(tmp_path) == ["step_000000003"]
    checkpoint.check_checkpoint(checkpoint.checkpoint_root(tmp_path) / "step_000000003")


def test_a_failed_background_write_stops_the_run_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    real_save = checkpoint.dcp.save
    calls = {"n": 0, "thread": None}

    def fails_second_time(state, *, checkpoint_id, **kwargs):
        calls["n"] += 1
        calls["thread"] = threading.current_thread()
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards are on disk, then it fails
        if calls["n"] == 2:
            raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(checkpoint.dcp, "save", fails_second_time)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step_000000004 .*No space left on device "
                                              r"\(injected\).* earlier checkpoints are untouched \(step_000000002\)"):
        run(tmp_path, ASYNC, "train.max_steps=8", "train.checkpoint_every=2")
    assert calls["thread"] is not threading.main_thread()  # it did fail in the background
    assert names(tmp_path) == ["step_000000002"]  # no step_000000004(.tmp), nothing written after the failure
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000002"
    assert not (tmp_path / "export").exists()  # the run did not go on to finish
    assert max(r["step"] for r in rows(tmp_path)) < 8
    assert not any(t.name.startswith("dinoscale-checkpoint") for t in threading.enumerate())


def test_a_failing_run_raises_its_own_error_without_waiting_long_for_the_save_in_flight(tmp_path, monkeypatch):
    slow_dcp_save(monkeypatch, 5.0)
    monkeypatch.setattr(loop, "FAILED_RUN_SAVE_WAIT_S", 0.2)
    real_step, calls = loop.train_step, {"n": 0}

    def third_step_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # right after the background save of step 2 started
            raise RuntimeError("boom (injected)")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", third_step_fails)
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, ASYNC, "train.max_steps=6", "train.checkpoint_every=2")
    writing = [t for t in threading.enumerate() if t.name == "dinoscale-checkpoint-2"]
    assert writing and not (checkpoint.checkpoint_root(tmp_path) / "step_000000002").exists()  # not waited for
    writing[0].join(60)  # left to finish on its own: it completes, intact
    assert names(tmp_path) == ["step_000000002"]
    checkpoint.check_checkpoint(checkpoint.checkpoint_root(tmp_path) / "step_000000002")
