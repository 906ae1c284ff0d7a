"""The process group's life cycle (dinoscale.distributed.init) and the collectives across processes:
the single-process fallback, seeds, and 2-process gloo runs where a missing rank is named."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinoscale import distributed as D
from dinoscale.distributed import DistributedEnvError
from dinoscale.distributed.init import _format_ranks

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- single process


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") or (
            name.startswith("SLURM_") or name == D.ARRIVAL_TIMEOUT_ENV
        ):
            monkeypatch.delenv(name)


def test_single_process_fallback(clean_env):
    info = D.init_distributed()
    assert info == D.DistInfo(0, 1, 0, 1, None, None, "single")
    assert not info.is_distributed
    assert not D.is_enabled() and D.get_rank() == 0 and D.get_world_size() == 1
    t = torch.arange(4.0)
    assert D.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(4.0))
    D.monitored_barrier(timeout_s=1)  # no-op, must not raise
    D.destroy_distributed()  # no-op
    assert not D.is_enabled()


def test_seed_everything_single_process():
    assert D.seed_everything(7, per_rank=True) == 7  # rank 0
    a = (np.random.rand(), torch.rand(3), __import__("random").random())
    assert D.seed_everything(7, per_rank=False) == 7
    b = (np.random.rand(), torch.rand(3), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    for bad in (-1, 1.5, True, 2**32):
        with pytest.raises(ValueError):
            D.seed_everything(bad, per_rank=False)


def test_format_ranks():
    assert _format_ranks([7, 1, 2, 3, 9]) == "1-3, 7, 9"
    assert _format_ranks([4]) == "4"


# ----------------------------------------------------------------------------- 2 processes


def _set_torchrun_env(rank, world_size, port):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]


def _worker(rank, world_size, port, scenario, out_dir):
    torch.set_num_threads(1)
    _set_torchrun_env(rank, world_size, port)
    result = {}
    try:
        if scenario == "never_arrives" and rank == 1:
            return  # never calls init_distributed: only the arrival timeout can end rank 0's wait
        if scenario == "never_arrives":
            os.environ[D.ARRIVAL_TIMEOUT_ENV] = "2"  # the configuration path users have
        try:
            info = D.init_distributed(arrival_timeout_s=None if scenario == "never_arrives" else 30)
        except RuntimeError as e:
            result["init_error"] = str(e)
            return
        result["info"] = [info.rank, info.world_size, info.local_rank, info.local_world_size, info.source]
        result["again_same"] = D.init_distributed() is info
        t = torch.tensor([float(rank + 1)])
        D.all_reduce_sum_(t)
        result["sum"] = t.item()
        with D.hide_process_group():  # as when one rank traces a step alone
            hidden = [D.is_enabled(), D.get_rank(), D.get_world_size(), D.all_reduce_sum_(torch.ones(1)).item()]
        result["hidden"] = hidden + [D.is_enabled()]
        result["seed"] = D.seed_everything(100, per_rank=True)
        result["shared_seed"] = D.seed_everything(100, per_rank=False)
        if scenario == "skips_barrier":
            if rank == 0:
                try:
                    D.monitored_barrier(timeout_s=2)
                except RuntimeError as e:
                    result["barrier_error"] = str(e)
            else:
                time.sleep(3.5)  # alive but busy elsewhere: only the timeout can end rank 0's wait
        else:
            D.monitored_barrier(timeout_s=30)
        D.destroy_distributed()
        result["enabled_after_destroy"] = D.is_enabled()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def _run(scenario, tmp_path, world_size=2):
    mp.spawn(_worker, args=(world_size, D.find_free_port(), scenario, str(tmp_path)), nprocs=world_size)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.distributed
def test_two_process_init_collectives_and_seeds(tmp_path):
    results = _run("ok", tmp_path)
    for rank, r in enumerate(results):
        assert r["info"] == [rank, 2, rank, 2, "torchrun"]
        assert r["again_same"]
        assert r["sum"] == 3.0
        assert r["hidden"] == [False, 0, 1, 1.0, True]  # single-process answers, the group back afterwards
        assert r["seed"] == 100 + rank and r["shared_seed"] == 100
        assert r["enabled_after_destroy"] is False


def _gather_backward_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    _set_torchrun_env(rank, world_size, port)
    D.init_distributed(arrival_timeout_s=30)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    for _ in range(3):  # several backward passes make the old exit-time abort more likely
        x.grad = None
        gathered = D.all_gather_with_grad(x)
        (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    D.destroy_distributed()
    # then a normal interpreter exit: that is what the test checks


@pytest.mark.distributed
def test_processes_exit_cleanly_after_backward_through_all_gather(tmp_path):
    """all_gather_with_grad sums gradients over ranks, and the processes exit with status 0 afterwards.

    With torch.distributed.nn.functional.all_gather about half of all processes aborted at exit
    (SIGABRT) after such a backward; four launches make it likely that a regression shows up, and the six
    multi-rank loss tests that end with a normal exit too.
    """
    for attempt in range(4):
        out = tmp_path / str(attempt)
        out.mkdir()
        mp.spawn(_gather_backward_worker, args=(2, D.find_free_port(), str(out)), nprocs=2)  # raises on SIGABRT
        for rank in range(2):
            r = torch.load(out / f"rank{rank}.pt")
            torch.testing.assert_close(r["gathered"], torch.tensor([1.0, 1, 2, 2])[:, None].expand(4, 3))
            # d/dx of sum_r sum_i w_i * gathered_i over both ranks' losses: 2 * (weights of this rank's rows)
            weights = torch.tensor([[1.0], [2.0]]) if rank == 0 else torch.tensor([[3.0], [4.0]])
            torch.testing.assert_close(r["grad"], (2 * weights).expand(2, 3))


class _GatherRefusingStridedGrads(torch.autograd.Function):
    """A stand-in for torch < 2.14's autograd gather: its backward reduce-scatters the gradient as it comes, and
    gloo refuses a non-contiguous one ("Expected input.is_contiguous()")."""

    @staticmethod
    def forward(ctx, tensor, gather_dim, group, tag=""):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        if not grad.is_contiguous():
            raise RuntimeError("Expected input.is_contiguous() to be true, but got false.")
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()], None, None, None


def _gather_expanded_grad_worker(rank, world_size, port, out_dir, before_2_14):
    torch.set_num_threads(1)
    if before_2_14:
        from torch.distributed import _functional_collectives as funcol

        funcol.all_gather_single_autograd = _GatherRefusingStridedGrads.apply
    _set_torchrun_env(rank, world_size, port)
    D.init_distributed(arrival_timeout_s=30)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    D.all_gather_with_grad(x).sum().backward()  # the gradient of a sum: an expanded, non-contiguous tensor
    torch.save(x.grad, os.path.join(out_dir, f"rank{rank}.pt"))
    D.destroy_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("before_2_14", [False, True])
def test_gather_backward_takes_a_non_contiguous_gradient(tmp_path, before_2_14):
    mp.spawn(_gather_expanded_grad_worker, args=(2, D.find_free_port(), str(tmp_path), before_2_14), nprocs=2)
    for rank in range(2):
        # both ranks' losses sum every gathered row once: each input element gets 2
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), torch.full((2, 3), 2.0))


@pytest.mark.distributed
def test_rank_that_never_arrives_is_named(tmp_path):
    start = time.monotonic()
    results = _run("never_arrives", tmp_path)
    err = results[0]["init_error"]
    assert "rank(s) 1 of 2 did not arrive" in err and "within 2 s" in err  # from $DINOSCALE_DIST_TIMEOUT
    assert D.ARRIVAL_TIMEOUT_ENV in err
    assert time.monotonic() - start < 30


@pytest.mark.distributed
def test_rank_missing_from_monitored_barrier_is_named(tmp_path):
    results = _run("skips_barrier", tmp_path)
    err = results[0]["barrier_error"]
    assert "rank(s) 1 of 2 did not reach the barrier" in err


def test_half_set_env_fails_init_before_any_network_call(clean_env, monkeypatch):
    # A half-set environment fails before any network activity, with the variable named.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedEnvError, match="RANK"):
        D.init_distributed()
    assert not D.is_enabled()


# ----------------------------------------------------------------------------- real SLURM

_SLURM_SCRIPT = """
import json, torch
from dinoscale import distributed as D
info = D.init_distributed(arrival_timeout_s=60)
t = torch.tensor([1.0]); D.all_reduce_sum_(t)
print(json.dumps({"info": list(info.__dict__.values()), "sum": t.item()}), flush=True)
D.destroy_distributed()
"""


@pytest.mark.slurm
def test_srun_two_nodes_forms_a_process_group(slurm_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        ["srun", "-N2", "-n2", "--time=2", sys.executable, "-c", _SLURM_SCRIPT],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    infos = sorted(line["info"] for line in lines)
    assert [i[0] for i in infos] == [0, 1]
    for rank, world_size, local_rank, local_world_size, addr, port, source in infos:
        assert (world_size, local_rank, local_world_size, source) == (2, 0, 1, "slurm")
        assert addr == "n1" and 15000 <= port < 30000
    assert all(line["sum"] == 2.0 for line in lines)
