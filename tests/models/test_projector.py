import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dinoscale.distributed import find_free_port
from dinoscale.models.projector import GlobalBatchNorm1d, ProjectionMLP
from dinoscale.train.optim import get_param_groups


def test_single_process_equals_batchnorm_in_training_mode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g) * 5 + 3
    ours, ref = GlobalBatchNorm1d(4), nn.BatchNorm1d(4)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        ours.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref.train()(x), rtol=1e-5, atol=1e-5)
    # it has no running statistics: eval mode still normalises with the batch
    torch.testing.assert_close(ours.eval()(x), ref.train()(x), rtol=1e-5, atol=1e-5)
    assert dict(ours.named_buffers()) == {}


def test_keeps_the_input_dtype_and_rejects_bad_shapes():
    bn = GlobalBatchNorm1d(3)
    assert bn(torch.randn(4, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        bn(torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        bn(torch.randn(1, 3))


def test_projection_mlp_layout_and_weight_decay_groups():
    mlp = ProjectionMLP(8, [16, 16], 4, bias=False, last_norm=True)
    assert mlp(torch.randn(5, 8)).shape == (5, 4)
    names = [n for n, _ in mlp.named_parameters()]
    assert names == ["layers.fc0.weight", "layers.norm0.weight", "layers.norm0.bias", "layers.fc1.weight",
                     "layers.norm1.weight", "layers.norm1.bias", "layers.fc2.weight"]  # last norm: no affine
    groups = get_param_groups(nn.ModuleDict({"projector": mlp}), n_blocks=0)
    no_decay = {id(p) for g in groups if g["wd_multiplier"] == 0.0 for p in g["params"]}
    decayed = [n for n, p in mlp.named_parameters() if id(p) not in no_decay]
    assert decayed == ["layers.fc0.weight", "layers.fc1.weight", "layers.fc2.weight"]
    assert isinstance(ProjectionMLP(8, [], 4).layers.fc0, nn.Linear)
    with pytest.raises(ValueError, match="unknown activation"):
        ProjectionMLP(8, [4], 2, activation="tanh")


WORLD_SIZE = 2
SIZES = (2, 5)  # unequal local batches: the statistics must still be those of the 7 samples


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(sum(SIZES), 3, generator=g) * 4 - 1, torch.randn(sum(SIZES), 3, generator=g)


def _output_and_grads(x, upstream):
    torch.manual_seed(0)
    bn = GlobalBatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, bn.weight.grad


def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        x, upstream = _data()
        mine = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
        y, grad_x, grad_w = _output_and_grads(x[mine], upstream[mine])
        dist.all_reduce(grad_w)  # summed: the objective here is the sum over ranks of the local sums
        torch.save({"y": y, "grad_x": grad_x, "grad_w": grad_w}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_with_unequal_batches_equal_the_full_batch(tmp_path):
    mp.spawn(_worker, args=(f"tcp://127.0.0.1:{find_free_port()}", str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    x, upstream = _data()
    y, grad_x, grad_w = _output_and_grads(x, upstream)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, rtol=1e-5, atol=1e-6)
    # L = sum over all samples of upstream * y; each rank's backward gets its rows' full gradient.
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), grad_x, rtol=1e-5, atol=1e-6)
    for got in ranks:
        torch.testing.assert_close(got["grad_w"], grad_w, rtol=1e-5, atol=1e-6)
