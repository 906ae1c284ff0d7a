"""PIRL: the jigsaw views, the memory bank's update (one process and two), and an exactly resumed run."""

import os
import random

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dinoscale.checkpoint import latest_checkpoint, read_dcp_checkpoint
from dinoscale.distributed import find_free_port
from dinoscale.methods.pirl import PIRL, jigsaw_tiles, pirl_collate


def _cells(image, cell):
    return [image[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] for r in range(3) for c in range(3)]


def test_jigsaw_tiles_are_a_permutation_of_the_cells():
    image = torch.rand(3, 24, 24)
    torch.manual_seed(0)
    tiles, cells = jigsaw_tiles(image, jigsaw_size=24, tile_size=8)  # tiles fill their cells: no jitter
    assert tiles.shape == (9, 3, 8, 8)
    assert sorted(cells.tolist()) == list(range(9)) and cells.tolist() != list(range(9))
    grid = _cells(image, 8)
    for k in range(9):
        assert torch.equal(tiles[k], grid[cells[k]])
    # Smaller tiles are jittered inside their cell: tile k is some 6x6 window of cell cells[k] and of no other.
    tiles, cells = jigsaw_tiles(image, jigsaw_size=24, tile_size=6)
    for k in range(9):
        homes = [c for c, cell in enumerate(grid)
                 if any(torch.equal(tiles[k], cell[:, y : y + 6, x : x + 6]) for y in range(3) for x in range(3))]
        assert homes == [cells[k].item()]
    # Another image size is resized to the jigsaw size first; the tiles are drawn from torch's (seeded) RNG.
    torch.manual_seed(1)
    a = jigsaw_tiles(torch.rand(3, 16, 16), 24, 6)
    torch.manual_seed(1)
    b = jigsaw_tiles(torch.rand(3, 16, 16), 24, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_views_and_collate(tiny_config):
    method = PIRL(tiny_config("pirl"))
    views = method.build_transform()(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert views["image"].shape == (3, 16, 16) and views["tiles"].shape == (9, 3, 8, 8)
    batch = method.build_collate(4)([(views, 3, 17), (views, 5, 2)], rng=random.Random(0))
    assert batch["images"].shape == (2, 3, 16, 16) and batch["tiles"].shape == (18, 3, 8, 8)
    assert batch["indices"].tolist() == [17, 2] and batch["labels"].tolist() == [3, 5]
    with pytest.raises(ValueError, match="dataset index"):
        pirl_collate([(views, 3)])


def _method_and_batch(cfg, n_images=6, seed=0):
    torch.manual_seed(seed)
    method = PIRL(cfg)
    student, _ = method.build_networks()
    transform = method.build_transform()
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    indices = [5, 9, 5, 40, 0, 63][:n_images]  # index 5 twice: the later sample updates it
    batch = pirl_collate([(transform(im), 0, i) for im, i in zip(images, indices)])
    return method, student, batch


def test_memory_bank_update(tiny_config):
    cfg = tiny_config("pirl", "pirl.bank_size=64")
    method, student, batch = _method_and_batch(cfg)
    before = method.memory_bank.clone()
    assert torch.allclose(before.norm(dim=1), torch.ones(64))
    loss, terms = method(student, None, batch, {})
    assert set(terms) == {"nce_jigsaw", "nce_image"} and method.bank_steps.item() == 1
    with torch.no_grad():
        cls = student["backbone"](batch["images"], is_training=True)["x_norm_clstoken"]
        f = F.normalize(student["image_head"](cls))
    expected = before.clone()
    for row, i in enumerate(batch["indices"].tolist()):  # in batch order: a repeated index ends at its last row
        expected[i] = F.normalize(0.5 * before[i] + 0.5 * f[row], dim=0)
    torch.testing.assert_close(method.memory_bank, expected)
    untouched = [i for i in range(64) if i not in batch["indices"].tolist()]
    assert torch.equal(method.memory_bank[untouched], before[untouched])
    # The bank is the method's checkpointed state; an index beyond it is refused.
    assert set(method.state_dict()) == {"memory_bank", "bank_steps"}
    batch["indices"][0] = 64
    with pytest.raises(ValueError, match="bank_size"):
        method(student, None, batch, {})


def _bank_worker(rank, world_size, port, cfg, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dinoscale import distributed

    distributed.init_distributed()
    try:
        method, student, batch = _method_and_batch(cfg)
        share = {k: v.chunk(world_size)[rank] for k, v in batch.items() if k != "tiles"}
        share["tiles"] = batch["tiles"].chunk(world_size)[rank]  # image-major: 9 tiles per image stay together
        loss, terms = method(student, None, share, {})
        torch.save({"bank": method.memory_bank, "steps": method.bank_steps, "loss": loss.detach()},
                   f"{out}/rank{rank}.pt")
    finally:
        distributed.destroy_distributed()


@pytest.mark.distributed
def test_two_ranks_update_the_bank_like_one_process(tiny_config, tmp_path):
    """Each rank holds half the batch; both update every sample's entry, so both banks equal the 1-process bank."""
    torch.set_num_threads(1)
    cfg = tiny_config("pirl", "pirl.bank_size=64", "model.drop_path_rate=0.0")
    method, student, batch = _method_and_batch(cfg)
    method(student, None, batch, {})
    mp.start_processes(_bank_worker, args=(2, find_free_port(), cfg, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])  # identical on every rank
    torch.testing.assert_close(ranks[0]["bank"], method.memory_bank, rtol=1e-5, atol=1e-6)
    assert ranks[0]["steps"].item() == ranks[1]["steps"].item() == 1


def test_resume_keeps_the_memory_bank_exact(runner, tmp_path):
    overrides = ["model.drop_path_rate=0.0", "train.checkpoint_every=2"]
    runner.train("pirl", *overrides, "train.max_steps=4", out=tmp_path / "full")
    runner.train("pirl", *overrides, "train.max_steps=2", out=tmp_path / "stopped")
    _, result = runner.train("pirl", *overrides, "train.max_steps=4", out=tmp_path / "stopped")
    assert result.step == 4
    full, resumed = runner.rows(tmp_path / "full"), runner.rows(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        losses = {k: v for k, v in a.items() if k.startswith("loss")}
        assert losses == {k: v for k, v in b.items() if k.startswith("loss")}
    banks = [read_dcp_checkpoint(latest_checkpoint(tmp_path / d))["method"] for d in ("full", "stopped")]
    assert banks[0]["bank_steps"].item() == banks[1]["bank_steps"].item() == 4
    initial = PIRL(runner.config("pirl"))
    initial.build_networks()
    assert not torch.equal(banks[0]["memory_bank"], initial.memory_bank)  # the run did update it
    assert torch.equal(banks[0]["memory_bank"], banks[1]["memory_bank"])  # bitwise
