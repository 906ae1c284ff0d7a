"""Process-group initialisation: environment parsing (torchrun, SLURM, single process), clear
errors for half-set environments, and 2-process gloo runs where a missing rank is named."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dinoscale import distributed as D
from dinoscale.distributed import DistributedEnvError, dist_info_from_env

REPO = Path(__file__).resolve().parents[1]

TORCHRUN_ENV = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
}


def _srun_env(**overrides):
    """The environment of task 6 of `srun -N2 -n8` (4 tasks per node) in job 123456."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_env():
    info = dist_info_from_env(TORCHRUN_ENV)
    assert info == D.DistInfo(5, 8, 1, 4, "node01", 29500, "torchrun")
    assert info.is_distributed


def test_torchrun_env_without_local_world_size_is_one_node():
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_WORLD_SIZE"}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    info = dist_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (1, 2, 1, 2)


def test_torchrun_has_priority_over_slurm():
    # `srun torchrun ...`: the worker sees both; torchrun's numbering is the real one.
    info = dist_info_from_env({**_srun_env(), **TORCHRUN_ENV})
    assert info.source == "torchrun" and info.rank == 5


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WORLD_SIZE": "2"}, ["WORLD_SIZE set", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]),
        ({**TORCHRUN_ENV, "MASTER_PORT": ""}, ["MASTER_PORT missing"]),
        ({**TORCHRUN_ENV, "MASTER_ADDR": None}, ["MASTER_ADDR missing"]),
        ({**TORCHRUN_ENV, "RANK": "8"}, ["RANK=8", "WORLD_SIZE=8"]),
        ({**TORCHRUN_ENV, "RANK": "two"}, ["RANK='two'", "not an integer"]),
        ({**TORCHRUN_ENV, "WORLD_SIZE": "0"}, ["WORLD_SIZE=0", ">= 1"]),
        ({**TORCHRUN_ENV, "LOCAL_RANK": "4"}, ["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
        ({**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "16"}, ["LOCAL_WORLD_SIZE=16", "WORLD_SIZE=8"]),
        ({**TORCHRUN_ENV, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
        ({"MASTER_ADDR": "node01", "MASTER_PORT": "29500"}, ["MASTER_ADDR, MASTER_PORT set", "RANK"]),
    ],
)
def test_half_set_environment_errors_name_the_variables(env, expected):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(DistributedEnvError) as err:
        dist_info_from_env(env)
    for fragment in expected:
        assert fragment in str(err.value), (fragment, str(err.value))


# ----------------------------------------------------------------------------- SLURM


def test_srun_env():
    info = dist_info_from_env(_srun_env())
    assert info.source == "slurm"
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (6, 8, 2, 4)
    assert info.master_addr == "gpu07"
    assert info.master_port == 15000 + 123456 % 15000
    assert 15000 <= info.master_port < 30000


def test_srun_port_depends_on_job_id():
    ports = {dist_info_from_env(_srun_env(SLURM_JOB_ID=str(j))).master_port for j in (100, 101, 102)}
    assert len(ports) == 3


@pytest.mark.parametrize("use_scontrol", [True, False])
@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node[01-03,07],gpu5", "node01"),
        ("gpu5,node[01-03,07]", "gpu5"),
        ("r[2-3]n[08-10]", "r2n08"),
        ("single-host", "single-host"),
    ],
)
def test_srun_master_is_first_host_of_nodelist(nodelist, first, use_scontrol):
    env = _srun_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=nodelist)
    assert dist_info_from_env(env, use_scontrol=use_scontrol).master_addr == first


def test_srun_step_nodelist_wins_over_job_nodelist():
    # `srun -N1` inside a two-node allocation runs on a subset: the master must be in the step.
    env = _srun_env(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_STEP_NODELIST="gpu08")
    assert dist_info_from_env(env).master_addr == "gpu08"


def test_srun_explicit_master_addr_and_port_win():
    info = dist_info_from_env(_srun_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="23456"))
    assert (info.master_addr, info.master_port, info.source) == ("10.0.0.1", 23456, "slurm")


def test_srun_ntasks_per_node_and_heterogeneous_tasks_per_node():
    env = _srun_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="3,5", SLURM_NODEID="1", SLURM_LOCALID="4")
    assert dist_info_from_env(env).local_world_size == 5
    env = _srun_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="4")
    assert dist_info_from_env(env).local_world_size == 4


@pytest.mark.parametrize(
    "overrides",
    [
        # the batch shell of `sbatch --ntasks=8`: SLURM_NTASKS is set, but there is no step
        {"SLURM_STEP_ID": None, "SLURM_STEP_NUM_TASKS": None, "SLURM_STEP_TASKS_PER_NODE": None, "SLURM_STEP_NODELIST": None},
        # salloc's interactive step and the batch step have reserved step ids
        {"SLURM_STEP_ID": str(0xFFFFFFFA)},
        {"SLURM_STEP_ID": "batch"},
        # `srun -n1`
        {"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
        # an allocation without --ntasks
        {"SLURM_STEP_ID": None, "SLURM_NTASKS": None, "SLURM_STEP_NUM_TASKS": None},
    ],
)
def test_slurm_without_multi_task_srun_step_is_single_process(overrides):
    assert dist_info_from_env(_srun_env(**overrides)).source == "single"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"SLURM_LOCALID": None}, ["SLURM_LOCALID"]),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, ["SLURM_JOB_NODELIST"]),
        ({"SLURM_JOB_ID": None}, ["SLURM_JOB_ID"]),
        ({"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_TASKS_PER_NODE": None}, ["SLURM_TASKS_PER_NODE"]),
        ({"SLURM_PROCID": "8"}, ["SLURM_PROCID=8", "(8)"]),
        ({"SLURM_LOCALID": "4"}, ["SLURM_LOCALID=4", "4(x2)"]),
        ({"SLURM_STEP_TASKS_PER_NODE": "4x2"}, ["SLURM_STEP_TASKS_PER_NODE='4x2'"]),
        ({"SLURM_STEP_NODELIST": "gpu[07-"}, ["SLURM_STEP_NODELIST", "unbalanced"]),
        ({"SLURM_STEP_NUM_TASKS": "many"}, ["SLURM_STEP_NUM_TASKS='many'"]),
    ],
)
def test_half_set_slurm_environment_errors(overrides, expected):
    with pytest.raises(DistributedEnvError) as err:
        dist_info_from_env(_srun_env(**overrides), use_scontrol=False)
    for fragment in expected:
        assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("a[1-2]b[1-2]", ["a1b1", "a1b2", "a2b1", "a2b2"]),
        ("gpu-a100-[1,3],cpu-x", ["gpu-a100-1", "gpu-a100-3", "cpu-x"]),
        ("host", ["host"]),
    ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
    assert D.parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[01-", "node]01[", "node[a-b]", "node[3-1]", "a,,b", "n[[1]]"])
def test_parse_slurm_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        D.parse_slurm_nodelist(bad)


def test_expand_nodelist_uses_scontrol_then_falls_back(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    # A site-specific answer that the pure-Python parser could not produce proves scontrol was used.
    fake.write_text("#!/bin/sh\necho from-scontrol-1\necho from-scontrol-2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert D.expand_slurm_nodelist("node[1-2]") == ["from-scontrol-1", "from-scontrol-2"]
    assert D.expand_slurm_nodelist("node[1-2]", use_scontrol=False) == ["node1", "node2"]
    fake.write_text("#!/bin/sh\necho 'scontrol: error: no slurm.conf' >&2\nexit 1\n")
    assert D.expand_slurm_nodelist("node[1-2]") == ["node1", "node2"]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
def test_parser_agrees_with_real_scontrol():
    nodelist = "node[01-03,07],gpu5,r[8-10]x[1-2]"
    try:
        real = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"scontrol unusable here: {e}")
    assert D.parse_slurm_nodelist(nodelist) == real


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


def test_arrival_timeout_from_env(clean_env, monkeypatch):
    assert D.get_arrival_timeout_s() == D.DEFAULT_ARRIVAL_TIMEOUT_S
    monkeypatch.setenv(D.ARRIVAL_TIMEOUT_ENV, "12.5")
    assert D.get_arrival_timeout_s() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(D.ARRIVAL_TIMEOUT_ENV, bad)
        with pytest.raises(DistributedEnvError, match=D.ARRIVAL_TIMEOUT_ENV):
            D.get_arrival_timeout_s()


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
    assert D._format_ranks([7, 1, 2, 3, 9]) == "1-3, 7, 9"
    assert D._format_ranks([4]) == "4"


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
