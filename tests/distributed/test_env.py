"""The launcher's environment (dinoscale.distributed.env): torchrun, SLURM and single-process layouts,
clear errors for half-set environments, node lists, the arrival timeout and the job's port."""

import os
import shutil
import subprocess

import pytest

from dinoscale import distributed as D
from dinoscale.distributed import DistributedEnvError, dist_info_from_env

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


# ----------------------------------------------------------------------------- arrival timeout, port


def test_arrival_timeout_from_env(monkeypatch):
    monkeypatch.delenv(D.ARRIVAL_TIMEOUT_ENV, raising=False)
    assert D.get_arrival_timeout_s() == D.DEFAULT_ARRIVAL_TIMEOUT_S
    monkeypatch.setenv(D.ARRIVAL_TIMEOUT_ENV, "12.5")
    assert D.get_arrival_timeout_s() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(D.ARRIVAL_TIMEOUT_ENV, bad)
        with pytest.raises(DistributedEnvError, match=D.ARRIVAL_TIMEOUT_ENV):
            D.get_arrival_timeout_s()


def test_master_port_for_job():
    assert D.master_port_for_job(123456) == D.master_port_for_job("123456") == 15000 + 123456 % 15000
    assert D.master_port_for_job("77_3") == 15000 + 773  # submitit's array-task id: its digits
    assert D.master_port_for_job("") == 15000
    assert all(15000 <= D.master_port_for_job(j) < 30000 for j in (0, 14999, 15000, 29999, 10**12))
