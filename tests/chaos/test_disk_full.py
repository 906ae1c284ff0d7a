"""The disk fills up while a checkpoint is written: the run ends at once, earlier checkpoints intact."""

from __future__ import annotations

import pytest

from dinoscale import checkpoint

pytestmark = pytest.mark.chaos

STARTUP_S = 300  # start-up and the steps up to the failing checkpoint
EXIT_BOUND_S = 20  # from the error's traceback to the end of the process
# 4096 prototypes per head make a checkpoint about 3.2 MB: three fit in the 12 MB tmpfs, the fourth does not.
BIG_HEADS = ["dino.head_n_prototypes=4096", "ibot.head_n_prototypes=4096"]


def test_full_disk_while_checkpointing(tmpfs, train_run):
    out = tmpfs / "out"
    run = train_run(out, [*BIG_HEADS, "train.num_workers=1", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                          "train.max_steps=12"])
    failed = run.wait_for("Traceback (most recent call last)", STARTUP_S)
    rc, ended = run.wait_exit(EXIT_BOUND_S)
    print(f"exited {ended - failed:.1f} s after the error (bound {EXIT_BOUND_S} s)")
    text = run.text()
    assert rc == 1, text[-4000:]
    root = checkpoint.checkpoint_root(out)
    assert f"training failed: CheckpointError: cannot write checkpoint step_000000004 to {root}" in text, text[-4000:]
    assert "It needs about" in text and "(the disk is full)" in text, text[-4000:]
    left = sorted(p.name for p in root.iterdir())
    assert left == ["step_000000001", "step_000000002", "step_000000003"], left  # no partial step_000000004.tmp
    for path in root.iterdir():
        checkpoint.check_checkpoint(path)
