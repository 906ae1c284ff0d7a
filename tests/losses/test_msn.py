import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoscale.distributed import find_free_port
from dinoscale.losses.msn import MSNLoss


def naive_msn(anchor_sims, target_sims, tau, t_exp, weight):
    """The docstring formula step by step in float64 (sharpening written as p ** (1/T), renormalised)."""
    anchor_sims, target_sims = anchor_sims.double(), target_sims.double()
    b, k = target_sims.shape
    n_views = anchor_sims.shape[0] // b
    targets = []
    for row in target_sims:
        p = torch.softmax(row / tau, dim=0) ** (1.0 / t_exp)
        targets.append(p / p.sum())
    ce, probs = 0.0, []
    for v in range(n_views):
        for i in range(b):
            p = torch.softmax(anchor_sims[v * b + i] / tau, dim=0)
            probs.append(p)
            ce += -float((targets[i] * torch.log(p)).sum())
    ce /= n_views * b
    mean_p = torch.stack(probs).mean(dim=0)
    entropy = -float((mean_p * torch.log(mean_p)).sum())
    return ce - weight * entropy, ce, entropy


def test_hand_computed_uniform_anchor():
    # Anchors equidistant from both prototypes predict [1/2, 1/2]: CE = log 2 whatever the target, and the
    # mean prediction is uniform, H = log 2.
    anchor = torch.zeros(2, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, parts = MSNLoss(temperature=0.1, target_temperature=0.25, me_max_weight=0.5)(anchor, target)
    assert parts["ce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert parts["entropy"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2) * (1 - 0.5), rel=1e-6)


def test_sharpening_is_a_softmax_at_tau_times_t():
    target = torch.tensor([[0.3, -0.2, 0.9]])
    t = MSNLoss(temperature=0.1, target_temperature=0.25).target_probs(target)
    # softmax(s / 0.1) ** 4, renormalised, is softmax(s / 0.025): exp(40 * (s - max))
    expected = torch.exp(40.0 * (target - target.max()))
    torch.testing.assert_close(t, expected / expected.sum(), rtol=1e-5, atol=1e-8)


def test_matches_the_formula_with_several_views():
    g = torch.Generator().manual_seed(0)
    anchor = torch.rand(3 * 4, 5, generator=g) * 2 - 1  # 3 views of 4 images, cosine similarities
    target = torch.rand(4, 5, generator=g) * 2 - 1
    loss, parts = MSNLoss(temperature=0.2, target_temperature=0.5, me_max_weight=2.0)(anchor, target)
    expected, ce, entropy = naive_msn(anchor, target, 0.2, 0.5, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["entropy"].item() == pytest.approx(entropy, rel=1e-5)


def test_no_gradient_through_the_target():
    anchor = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(2, 3, requires_grad=True)
    loss, _ = MSNLoss()(anchor, target)
    loss.backward()
    assert target.grad is None and anchor.grad is not None


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple"):
        MSNLoss()(torch.randn(5, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="expects"):
        MSNLoss()(torch.randn(4, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive temperatures"):
        MSNLoss(target_temperature=0.0)


WORLD_SIZE, PER_RANK, N_VIEWS, K = 2, 3, 2, 4


def _data():
    g = torch.Generator().manual_seed(99)
    # view-major over the full batch: rows v * 6 + i for image i
    anchor = torch.randn(N_VIEWS * WORLD_SIZE * PER_RANK, K, generator=g)
    return anchor, torch.randn(WORLD_SIZE * PER_RANK, K, generator=g)


def _rank_rows(anchor, rank):
    """This rank's images in every view, still view-major."""
    full = WORLD_SIZE * PER_RANK
    return torch.cat([anchor[v * full + rank * PER_RANK : v * full + (rank + 1) * PER_RANK] for v in range(N_VIEWS)])


def _loss_and_grad(anchor, target):
    anchor = anchor.clone().requires_grad_(True)
    loss, parts = MSNLoss(temperature=0.5, target_temperature=0.5, me_max_weight=3.0)(anchor, target)
    loss.backward()
    return loss.detach(), parts["entropy"], anchor.grad


def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        anchor, target = _data()
        loss, entropy, grad = _loss_and_grad(_rank_rows(anchor, rank), target[rank * PER_RANK : (rank + 1) * PER_RANK])
        torch.save({"loss": loss, "entropy": entropy, "grad": grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_the_full_batch(tmp_path):
    mp.spawn(_worker, args=(f"tcp://127.0.0.1:{find_free_port()}", str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    anchor, target = _data()
    loss, entropy, grad = _loss_and_grad(anchor, target)
    # me-max uses the mean prediction of the global batch on every rank ...
    for got in ranks:
        assert got["entropy"].item() == pytest.approx(entropy.item(), rel=1e-6)
    # ... the cross-entropy is a per-rank mean, so the ranks' mean loss is the full-batch loss ...
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    # ... and the data-parallel average of the gradients (rank gradient / world size per row) is the full one.
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["grad"] / WORLD_SIZE, _rank_rows(grad, r), rtol=1e-5, atol=1e-7)
