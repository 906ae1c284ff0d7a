import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dinoscale.distributed import find_free_port
from dinoscale.losses.nt_xent import NTXentLoss


def naive_nt_xent(z_a, z_b, temperature):
    """The docstring formula, one embedding at a time in float64."""
    u = F.normalize(torch.cat([z_a, z_b]).double(), dim=1)
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [float(u[i] @ u[k]) / temperature for k in range(2 * n)]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / (2 * n)


def test_two_orthogonal_images_closed_form():
    # Both views of image 1 are e1, of image 2 e2: each embedding has its positive at cosine 1 and two
    # negatives at cosine 0, so l_i = -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t)) for every i.
    t = 0.5
    z = torch.eye(2)
    loss = NTXentLoss(temperature=t)(z, z.clone())
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)


def test_matches_the_formula_and_ignores_the_norm():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss = NTXentLoss(temperature=0.2)
    assert loss(z_a, z_b).item() == pytest.approx(naive_nt_xent(z_a, z_b, 0.2), rel=1e-5)
    assert loss(3.0 * z_a, 0.5 * z_b).item() == pytest.approx(loss(z_a, z_b).item(), rel=1e-5)
    # Swapping the views is the same set of terms.
    assert loss(z_b, z_a).item() == pytest.approx(loss(z_a, z_b).item(), rel=1e-6)


def test_aligned_views_beat_random_ones():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 8, generator=g)
    loss = NTXentLoss(temperature=0.1)
    assert loss(z, z + 0.01 * torch.randn(16, 8, generator=g)) < loss(z, torch.randn(16, 8, generator=g))


def test_bad_inputs_are_named():
    loss = NTXentLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2 images"):
        loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="positive temperature"):
        NTXentLoss(temperature=0.0)


WORLD_SIZE, PER_RANK, DIM = 2, 3, 5


def _data():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2 * WORLD_SIZE * PER_RANK, DIM, generator=g), torch.randn(DIM, DIM, generator=g)


def _loss_and_grads(x_a, x_b, weight):
    """A linear "network" shared by both views, so parameter gradients can be compared as well as inputs'."""
    weight = weight.clone().requires_grad_(True)
    x_a, x_b = x_a.clone().requires_grad_(True), x_b.clone().requires_grad_(True)
    loss = NTXentLoss(temperature=0.3)(x_a @ weight, x_b @ weight)
    loss.backward()
    return loss.detach(), x_a.grad, x_b.grad, weight.grad


def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        x, weight = _data()
        x_a, x_b = x.chunk(2)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss, grad_a, grad_b, grad_w = _loss_and_grads(x_a[mine], x_b[mine], weight)
        dist.all_reduce(grad_w)
        grad_w /= WORLD_SIZE  # what data parallel does with parameter gradients
        torch.save({"loss": loss, "grad_a": grad_a, "grad_b": grad_b, "grad_w": grad_w},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_the_full_batch(tmp_path):
    mp.spawn(_worker, args=(f"tcp://127.0.0.1:{find_free_port()}", str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    x, weight = _data()
    x_a, x_b = x.chunk(2)
    loss, grad_a, grad_b, grad_w = _loss_and_grads(x_a, x_b, weight)
    # Each rank averages over its own embeddings (negatives from both ranks): the mean over ranks is the loss.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # the ranks really hold different halves
    # The full-batch gradient of an input row is its rank's gradient divided by the world size (the data-parallel
    # average), and the averaged parameter gradient is the full-batch one.
    for r, got in enumerate(ranks):
        mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
        torch.testing.assert_close(got["grad_a"] / WORLD_SIZE, grad_a[mine], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["grad_b"] / WORLD_SIZE, grad_b[mine], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["grad_w"], grad_w, rtol=1e-5, atol=1e-7)
