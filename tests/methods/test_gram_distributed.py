"""Gram anchoring on two gloo ranks (FSDP2): the training run equals one process, and a sharded Gram teacher
(``parallel.parallelize_frozen``, copied shard by shard from the sharded EMA teacher) gives the unsharded one's
targets."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.distributed import find_free_port
from tests.test_train_distributed import BASE, TERMS, assert_same_losses, launch, losses

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.distributed

# copied at the start of step 1, refreshed at the start of step 2 (then once more at most: max_updates=1)
GRAM = ["gram.enabled=true", "gram.it_load_ema_teacher=1", "gram.update_frequency=2", "gram.it_first_update=2",
        "gram.max_updates=1", "gram.loss_weight=2.0", "teacher.momentum_teacher=0.9",
        "teacher.final_momentum_teacher=0.9"]


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_two_rank_gram_run_equals_one_process(tmp_path):
    launch(1, tmp_path / "one", "train.max_steps=4", *GRAM)
    launch(2, tmp_path / "two", "train.max_steps=4", *GRAM)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert_same_losses(a, b, range(1, 5))
    assert a[1]["loss/gram"] == 0.0 and all(a[s]["loss/gram"] > 0 for s in (2, 3, 4))
    for step in range(1, 5):
        assert a[step]["loss/gram"] == pytest.approx(b[step]["loss/gram"], rel=1e-4, abs=1e-6), step
    one, two = (checkpoint.read_dcp_checkpoint(checkpoint.latest_checkpoint(tmp_path / d))["networks"]["gram_teacher"]
                for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:  # the sharded Gram teacher of the 2-rank checkpoint, gathered, is the one-process one
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)


def _targets_worker(rank, world_size, port, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dinoscale import distributed
    from dinoscale.methods.registry import build_method
    from dinoscale.parallel import build_mesh, parallelize_frozen, parallelize_student_teacher
    from dinoscale.train.teacher import init_teacher_from_student_

    distributed.init_distributed()
    try:
        cfg = load_config("quickstart", BASE + GRAM + ["model.arch=dinov3_vits16"])
        torch.manual_seed(0)
        method = build_method(cfg)
        student, teacher = method.build_networks()
        init_teacher_from_student_(teacher, student)
        with torch.no_grad():  # a teacher unlike the Gram teacher's random init
            for p in teacher.parameters():
                p.add_(0.01 * torch.randn_like(p))
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        batch = {"global_crops": images}
        reference = copy.deepcopy(method.gram.network)
        reference_anchor = copy.copy(method.gram)
        reference_anchor.network = reference
        reference_anchor.before_step(1, teacher)  # the copy, unsharded
        expected = reference_anchor.targets(batch, (4, 4))

        mesh = build_mesh(hybrid_shard=False)
        parallelize_student_teacher(student, teacher, mesh=mesh, param_dtype=torch.float32)
        parallelize_frozen(method.gram.network, mesh=mesh, dtype=torch.float32)
        method.before_step(1, teacher)  # shard by shard
        assert type(method.gram.network["backbone"].blocks[0].attn.qkv.weight).__name__ == "DTensor"
        got = method.gram.targets(batch, (4, 4))
        loss = method.gram.loss(got + 0.1, got)  # the loss of the sharded targets runs as the unsharded one
        results.put((rank, (got - expected).abs().max().item(), expected.abs().max().item(), loss.item(),
                     method.gram.loss(expected + 0.1, expected).item()))
    finally:
        distributed.destroy_distributed()


def test_sharded_gram_teacher_gives_the_unsharded_targets():
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_targets_worker, args=(2, find_free_port(), results), nprocs=2, join=True,
                       start_method="spawn")
    outcomes = sorted(results.get() for _ in range(2))
    for rank, diff, scale, loss, expected_loss in outcomes:
        assert scale > 0 and diff <= 1e-5 * scale, (rank, diff, scale)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
