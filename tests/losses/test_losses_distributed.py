"""Two gloo processes on CPU, each holding part of a batch, must reproduce the single-process
result on the full batch (centers, Sinkhorn-Knopp targets, KoLeo value and gradient)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoscale.losses.dino import DINOLoss
from dinoscale.losses.ibot import iBOTPatchLoss
from dinoscale.losses.koleo import KoLeoLoss, nearest_neighbour_indices

WORLD_SIZE = 2
K = 5
# iBOT: rank 0 holds 3 masked patches, rank 1 holds 5, so a per-rank mean of means would be wrong.
IBOT_SPLIT = (3, 5)


def _data():
    g = torch.Generator().manual_seed(1234)
    return {
        "cls_logits": torch.randn(8, K, generator=g),
        "patch_logits": torch.randn(sum(IBOT_SPLIT), K, generator=g),
        "features": torch.randn(8, 6, generator=g, dtype=torch.float64).float(),
    }


def _rank_slice(tensor, rank, sizes):
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        data = _data()
        even = (4, 4)
        result = {}

        cls_local = _rank_slice(data["cls_logits"], rank, even)
        dino = DINOLoss(K, center_momentum=0.8)
        dino.update_center(cls_local)
        result["dino_center"] = dino.center.clone()
        result["dino_probs"] = dino.softmax_center_teacher(cls_local, teacher_temp=0.3)
        result["dino_sk"] = dino.sinkhorn_knopp_teacher(cls_local, teacher_temp=0.3)

        patch_local = _rank_slice(data["patch_logits"], rank, IBOT_SPLIT)
        ibot = iBOTPatchLoss(K, center_momentum=0.8)
        ibot.update_center(patch_local)
        result["ibot_center"] = ibot.center.clone()
        count = torch.tensor([patch_local.shape[0]])
        result["ibot_sk"] = ibot.sinkhorn_knopp_teacher(patch_local, 0.3, n_masked_patches_tensor=count)
        result["ibot_count_after"] = count.clone()

        x = _rank_slice(data["features"], rank, even).clone().requires_grad_(True)
        koleo = KoLeoLoss(distributed=True)(x)
        koleo.backward()
        result["koleo"] = koleo.detach()
        result["koleo_grad"] = x.grad.clone()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_losses_match_single_process_on_full_batch(tmp_path):
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_worker, args=(init_method, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    data = _data()

    # DINO centering: every rank holds the center of the full batch.
    dino = DINOLoss(K, center_momentum=0.8)
    dino.update_center(data["cls_logits"])
    full_probs = dino.softmax_center_teacher(data["cls_logits"], 0.3)
    full_sk = dino.sinkhorn_knopp_teacher(data["cls_logits"], 0.3)
    for r, res in enumerate(ranks):
        assert torch.allclose(res["dino_center"], dino.center, atol=1e-6)
        assert torch.allclose(res["dino_probs"], _rank_slice(full_probs, r, (4, 4)), atol=1e-6)
        assert torch.allclose(res["dino_sk"], _rank_slice(full_sk, r, (4, 4)), atol=1e-6)

    # iBOT: center is the mean over all 8 masked patches; Sinkhorn-Knopp uses B = 3 + 5.
    ibot = iBOTPatchLoss(K, center_momentum=0.8)
    ibot.update_center(data["patch_logits"])
    full_ibot_sk = ibot.sinkhorn_knopp_teacher(data["patch_logits"], 0.3, sum(IBOT_SPLIT))
    for r, res in enumerate(ranks):
        assert torch.allclose(res["ibot_center"], ibot.center, atol=1e-6)
        assert torch.allclose(res["ibot_sk"], _rank_slice(full_ibot_sk, r, IBOT_SPLIT), atol=1e-6)
        assert res["ibot_count_after"].item() == IBOT_SPLIT[r]

    # KoLeo: some nearest neighbours live on the other rank, or the test would prove nothing.
    feats = torch.nn.functional.normalize(data["features"], dim=-1)
    nn_idx = nearest_neighbour_indices(feats, feats)
    assert ((torch.arange(8) < 4) != (nn_idx < 4)).any()
    x = data["features"].clone().requires_grad_(True)
    full_loss = KoLeoLoss()(x)
    full_loss.backward()
    # Data parallel averages the ranks' losses and gradients.
    mean_loss = sum(res["koleo"] for res in ranks) / WORLD_SIZE
    assert torch.allclose(mean_loss, full_loss.detach(), atol=1e-6)
    # Each rank's input gradient already sums the contributions of all ranks' losses (the
    # all_gather backward); averaging over ranks gives the full-batch gradient.
    grad = torch.cat([res["koleo_grad"] for res in ranks]) / WORLD_SIZE
    assert torch.allclose(grad, x.grad, atol=1e-6)
    # The local losses differ from each other, so the check above is not trivially satisfied.
    assert not torch.allclose(ranks[0]["koleo"], ranks[1]["koleo"])
