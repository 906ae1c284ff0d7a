import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoscale.distributed import find_free_port
from dinoscale.losses.barlow_twins import BarlowTwinsLoss

EPS = 1e-5


def naive_barlow_twins(z_a, z_b, lam, eps=EPS):
    """The docstring formula with explicit sums in float64."""
    z_a, z_b = z_a.double(), z_b.double()
    n, d = z_a.shape

    def standardise(z):
        mean = z.mean(dim=0)
        var = ((z - mean) ** 2).mean(dim=0)
        return (z - mean) / torch.sqrt(var + eps)

    a, b = standardise(z_a), standardise(z_b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = float(sum(a[k, i] * b[k, j] for k in range(n))) / n
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return loss


def test_hand_computed_two_samples():
    # Each dimension of z takes two values one apart around its mean, so it standardises to -+1/sqrt(1 + eps).
    z = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # standardised: [[-1, 1], [1, -1]] * s
    c = 1.0 / (1.0 + EPS)  # s^2
    lam = 0.5
    loss = BarlowTwinsLoss(lambda_offdiag=lam)
    # Same views: C = c * [[1, -1], [-1, 1]].
    torch.testing.assert_close(loss.cross_correlation(z, z), c * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert loss(z, z).item() == pytest.approx(2 * (1 - c) ** 2 + lam * 2 * c**2, rel=1e-6)
    # Second view with its two dimensions swapped: C = -c * [[1, -1], [-1, 1]], so the diagonal is -c.
    swapped = z.flip(1)
    assert loss(z, swapped).item() == pytest.approx(2 * (1 + c) ** 2 + lam * 2 * c**2, rel=1e-6)


def test_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g) * 3 + 1
    assert BarlowTwinsLoss(0.01)(z_a, z_b).item() == pytest.approx(naive_barlow_twins(z_a, z_b, 0.01), rel=1e-5)
    # lambda only weighs the off-diagonal part
    on_diag = BarlowTwinsLoss(0.0)(z_a, z_b).item()
    full = BarlowTwinsLoss(1.0)(z_a, z_b).item()
    assert naive_barlow_twins(z_a, z_b, 0.0) == pytest.approx(on_diag, rel=1e-5)
    assert full > on_diag


def test_invariant_to_per_dimension_affine_changes():
    g = torch.Generator().manual_seed(2)
    z_a, z_b = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    scale, shift = torch.tensor([2.0, 0.5, 10.0]), torch.tensor([1.0, -3.0, 0.0])
    loss = BarlowTwinsLoss()
    assert loss(z_a * scale + shift, z_b).item() == pytest.approx(loss(z_a, z_b).item(), rel=1e-4)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same shape"):
        BarlowTwinsLoss()(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        BarlowTwinsLoss()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="lambda_offdiag"):
        BarlowTwinsLoss(lambda_offdiag=-1.0)


WORLD_SIZE, PER_RANK, DIM = 2, 3, 4


def _data():
    g = torch.Generator().manual_seed(4321)
    return torch.randn(2 * WORLD_SIZE * PER_RANK, DIM, generator=g), torch.randn(DIM, DIM, generator=g)


def _loss_and_grads(x_a, x_b, weight):
    weight = weight.clone().requires_grad_(True)
    x_a, x_b = x_a.clone().requires_grad_(True), x_b.clone().requires_grad_(True)
    loss = BarlowTwinsLoss(lambda_offdiag=0.1)(x_a @ weight, x_b @ weight)
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
        grad_w /= WORLD_SIZE  # the data-parallel average
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
    # Statistics and C are those of the global batch: every rank computes the full-batch value ...
    for got in ranks:
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    # ... and its gradients, once averaged over ranks as data parallel does, are the full-batch gradients.
    for r, got in enumerate(ranks):
        mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
        torch.testing.assert_close(got["grad_a"] / WORLD_SIZE, grad_a[mine], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["grad_b"] / WORLD_SIZE, grad_b[mine], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["grad_w"], grad_w, rtol=1e-4, atol=1e-6)
