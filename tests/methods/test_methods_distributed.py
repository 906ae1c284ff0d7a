"""Two gloo processes training through the unmodified loop (FSDP2 over 2 ranks) end where one process does.

The batch-coupled parts (NT-Xent negatives, Barlow Twins statistics, MSN's mean prediction, the projectors'
global batch norm, PIRL's memory bank updated from every rank's samples and its negatives drawn alike on all)
and the world-size-independent data (batches, SimMIM's and BEiT's masks; BEiT's loss is normalised by the
global batch's count of masked patches) make a 2-rank run of a method the same computation
as a 1-rank run on the same global batch, so losses and gradient norms must agree.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinoscale.config import load_config
from dinoscale.distributed import find_free_port

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist"),
]

GLOBAL_BATCH = 8
BASE = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.img_size=16",
    "model.drop_path_rate=0.0",  # stochastic depth draws per-rank randomness: off for an exact comparison
    # With LayerScale's 1e-5 the [CLS] features of different images are nearly equal at init, and the
    # projectors' batch norm would standardise float32 rounding noise (summation order differs with 2 ranks).
    "model.layerscale=null",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    # per-sample photometry (seeded by the sample's position); on the device it is drawn per rank's batch
    "crops.photometric_on_device=false",
    "train.num_workers=0", "train.log_every=1", "train.tensorboard=false", "train.autocast=none",
    "train.official_epoch_length=4", "optim.epochs=2", "optim.warmup_epochs=0", "optim.base_lr=0.002",
    "optim.scale_lr_with_batch=false", "evaluation.final_knn=false", "train.max_steps=3",
    "train.dataset=fashion-mnist:train", "train.build_shards_from=null",
    "compute.param_dtype=fp32",  # compare numerics, not bf16 rounding
    "simclr.proj_hidden_dim=32", "simclr.proj_out_dim=16",
    "barlow_twins.proj_dims=[32,32]",
    "simmim.mask_patch_size=8",
    "msn.proj_hidden_dim=32", "msn.proj_out_dim=16", "msn.num_prototypes=32",
    "msn.patch_drop=0.0",  # MSN's masks come from each rank's own RNG stream
    "pirl.embed_dim=16", "pirl.bank_size=60000", "pirl.num_negatives=64", "pirl.jigsaw_size=24", "pirl.tile_size=8",
    "beit.num_masking_patches=6", "beit.min_block_patches=2",
]


def _worker(rank, world_size, port, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dinoscale import distributed
    from dinoscale.train.loop import train

    distributed.init_distributed()
    try:
        assert train(load_config("quickstart", overrides)).status == "finished"
    finally:
        distributed.destroy_distributed()


def run(world_size, out_dir, method, extra=()):
    """The per-step metric rows of a run on ``world_size`` processes (1: a plain process, no group)."""
    overrides = BASE + [f"method={method}", f"train.batch_size_per_rank={GLOBAL_BATCH // world_size}",
                        f"train.output_dir={out_dir}", *extra]
    if world_size == 1:
        from dinoscale.train.loop import train

        train(load_config("quickstart", overrides))
    else:
        mp.start_processes(_worker, args=(world_size, find_free_port(), overrides), nprocs=world_size, join=True,
                           start_method="spawn")
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "type" not in r]


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "simmim", "msn", "pirl", "beit"])
def test_two_ranks_train_like_one(tmp_path, method, request):
    torch.set_num_threads(1)
    # BEiT's frozen tokenizer (sharded over the two ranks for inference) is the tiny_tokenizer fixture.
    extra = [f"beit.tokenizer={request.getfixturevalue('tiny_tokenizer')}"] if method == "beit" else []
    one = run(1, tmp_path / "one", method, extra)
    two = run(2, tmp_path / "two", method, extra)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    # The logged loss terms are averaged over ranks, and the gradient norm is that of the full gradient: the
    # first step compares the gradients of identical weights, the later ones the updated weights as well.
    # (The weights themselves are not compared element-wise: Adam's first steps turn rounding noise in
    # near-zero gradients into full-size sign steps.)
    keys = [k for k in one[0] if k == "grad_norm" or k.startswith("loss")]
    assert len(keys) >= 2, keys
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (method, a["step"], key, a[key], b[key])
