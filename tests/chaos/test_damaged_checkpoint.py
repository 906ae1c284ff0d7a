"""A damaged newest checkpoint: the rerun reports it, resumes from the newest intact one and ends where the
uninterrupted run ends."""

from __future__ import annotations

import shutil

import pytest

from tests.chaos.conftest import FMNIST, logged_losses, run_to_end

pytestmark = [pytest.mark.chaos, pytest.mark.skipif(not FMNIST.exists(), reason="needs dataset-fashion-mnist")]

RERUN_BOUND_S = 300  # the rerun, start-up included (four steps of a tiny ViT)
STEPS = ["train.max_steps=6", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The losses of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_to_end(out, STEPS)
    return logged_losses(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after step 4, with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    run_to_end(out, ["train.max_steps=4", "train.checkpoint_every=2"])
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": (truncate, "__0_0.distcp has"),
    "missing": (lambda path: path.unlink(), "__0_0.distcp is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_rerun_resumes_from_the_newest_intact_checkpoint(tmp_path, train_run, reference, stopped, damage):
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    newest = out / "checkpoints" / "step_000000004"
    apply, problem = DAMAGE[damage]
    apply(newest / "__0_0.distcp")

    run = train_run(out, STEPS)
    rc, _ = run.wait_exit(RERUN_BOUND_S)
    text = run.text()
    assert rc == 0, text[-4000:]
    assert f"checkpoint {newest} is damaged: {problem}" in text, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000000002'} at step 2" in text, text[-4000:]
    losses = logged_losses(out)
    assert [losses[s] for s in (3, 4, 5, 6)] == [reference[s] for s in (3, 4, 5, 6)], (losses, reference)
