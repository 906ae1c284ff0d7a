"""tools/submit.py and dinoscale.launch without a SLURM cluster: --dry-run, argument checks, the
requeue hand-off pieces, and real runs through submitit's LocalExecutor (with a preemption)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinoscale.distributed import dist_info_from_env, master_port_for_job
from dinoscale.launch import TrainingJob, export_torch_distributed_env

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "tools" / "submit.py"

# A tiny DINOv2 run on Fashion-MNIST (28 px): a step takes well under a second on one core.
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "crops.local_crops_number=2", "train.batch_size_per_rank=8", "train.num_workers=0",
    "train.autocast=none", "train.tensorboard=false", "train.log_every=1", "evaluation.final_knn=false",
    # read the IDX files directly: building the quickstart's shards in every job's checkout costs a minute
    "train.dataset=fashion-mnist:train", "train.build_shards_from=null",
]


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("dinoscale_tools_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "type" not in r]  # step rows only (no events)


# ---------------------------------------------------------------------------------------------
# --dry-run
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_sbatch(tmp_path, monkeypatch):
    """An `sbatch` first on PATH that records any call, and a SlurmExecutor that refuses to exist."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "sbatch_called"
    fake = bindir / "sbatch"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\necho 'Submitted batch job 1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    import submitit

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not create a SlurmExecutor")

    monkeypatch.setattr(submitit, "SlurmExecutor", refuse)
    return marker


def test_dry_run_gpu_defaults_and_all_options(submit, tmp_path, capsys, no_sbatch):
    out_template = str(tmp_path / "runs" / "%j")
    rc = submit.main([
        "--dry-run", "--nodes", "2", "--partition", "learnlab", "--account", "vision", "--qos", "high",
        "--timeout", "600", "--exclude", "node[01-02]", "--constraint", "volta32gb", "--comment", "dino run",
        "--job-name", "dino-vitl", "--mem", "480G", "--output-dir", out_template,
        "--config", "configs/quickstart.yaml", "train.max_steps=5", "optim.base_lr=0.001",
    ])
    out = capsys.readouterr().out
    assert rc == 0
    assert "nothing submitted" in out
    assert not no_sbatch.exists(), "dry run called sbatch"
    # Defaults: 8 GPUs per node, one task per GPU, 10 CPUs per task.
    for line in [
        "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --cpus-per-task=10", "#SBATCH --partition=learnlab", "#SBATCH --account=vision",
        "#SBATCH --qos=high", "#SBATCH --time=600", "#SBATCH --exclude='node[01-02]'",
        "#SBATCH --constraint=volta32gb", "#SBATCH --comment='dino run'", "#SBATCH --job-name=dino-vitl",
        "#SBATCH --mem=480G", "#SBATCH --signal=USR2@90",
    ]:
        assert line in out.splitlines(), f"missing {line!r} in:\n{out}"
    # The overrides reach training, output dir last and absolute, %j left for the job to expand.
    assert "#   train.max_steps=5" in out and "#   optim.base_lr=0.001" in out
    assert f"#   train.output_dir={out_template}" in out
    # Logs cannot live under %j (the directory must exist before the job id is known).
    log_dir = tmp_path / "runs" / "submitit_logs"
    assert f"#SBATCH --output={log_dir}/%j_0_log.out" in out
    assert f"-m submitit.core._submit {log_dir}" in out
    assert "--kill-on-bad-exit=1" in out
    assert not (tmp_path / "runs").exists(), "dry run created directories"


def test_dry_run_cpu_tasks_and_fixed_output_dir(submit, tmp_path, capsys, no_sbatch):
    run_dir = tmp_path / "run1"
    rc = submit.main(["--dry-run", "--ngpus", "0", "--tasks-per-node", "2", "--nodes", "3",
                      "--output-dir", str(run_dir), "--log-dir", str(tmp_path / "logs"), "train.max_steps=7"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --nodes=3" in lines
    assert "#SBATCH --cpus-per-task=1" in lines
    assert not any("gpus" in line for line in lines if line.startswith("#SBATCH")), out
    assert f"#   train.output_dir={run_dir}" in out
    assert f"#SBATCH --output={tmp_path / 'logs'}/%j_0_log.out" in lines
    assert not no_sbatch.exists()


def test_dry_run_relative_output_dir_is_made_absolute(submit, tmp_path, capsys, monkeypatch, no_sbatch):
    monkeypatch.chdir(tmp_path)
    assert submit.main(["--dry-run", "--output-dir", "out/%j"]) == 0
    out = capsys.readouterr().out
    assert f"#   train.output_dir={tmp_path}/out/%j" in out
    assert f"#SBATCH --output={tmp_path}/out/submitit_logs/%j_0_log.out" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks-per-node", "2"], "--tasks-per-node only applies with --ngpus 0"),
        (["--ngpus", "-1"], "--ngpus must be >= 0"),
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--mem", "lots"], "--mem must look like"),
        (["--log-dir", "/tmp/%j"], "--log-dir cannot contain %j"),
        (["--local", "--nodes", "2", "--ngpus", "0"], "--local runs on this machine only"),
        (["--timeout", "1", "--signal-delay", "90"], "--signal-delay (90s) must be shorter"),
        (["train.max_steps"], "config override 'train.max_steps' is not of the form key=value"),
        (["train.output_dir=/x"], "set the run directory with --output-dir"),
        (["--config", "configs/does_not_exist.yaml"], "--config: no such file"),
    ],
)
def test_bad_arguments_are_rejected_by_name(submit, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        submit.main(["--dry-run", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_config_key_fails_at_submission(submit, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        submit.main(["--dry-run", "--output-dir", str(tmp_path / "r"), "train.max_stepz=3"])
    assert "config error" in str(exc.value.code) and "train.max_stepz" in str(exc.value.code)


# ---------------------------------------------------------------------------------------------
# dinoscale.launch pieces
# ---------------------------------------------------------------------------------------------


def test_training_job_pickles_and_checkpoint_counts_requeues():
    job = TrainingJob("configs/quickstart.yaml", ["train.max_steps=3"], max_requeues=2)
    clone = pickle.loads(pickle.dumps(job))
    assert (clone.config_path, clone.overrides, clone.max_requeues, clone.requeue_count) == (
        "configs/quickstart.yaml", ["train.max_steps=3"], 2, 0)

    first = job.checkpoint()
    assert first is not None and first.function.requeue_count == 1
    assert first.function.overrides == job.overrides and first.function.config_path == job.config_path
    second = first.function.checkpoint()
    assert second.function.requeue_count == 2
    # The cap: the third preemption ends the job instead of requeueing it once more.
    assert second.function.checkpoint() is None
    with pytest.raises(ValueError, match="max_requeues"):
        TrainingJob(None, [], max_requeues=-1)


def test_distributed_env_from_submitit_environment(monkeypatch):
    class FakeEnv:
        global_rank, num_tasks, local_rank, num_nodes, node = 3, 4, 1, 2, 1
        hostnames = ["n1", "n2"]
        job_id = "1234"

    # A private copy of the environment: nothing set here may leak into later tests' subprocesses.
    environ = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    monkeypatch.setattr(os, "environ", environ)
    values = export_torch_distributed_env(FakeEnv())
    assert values == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "GROUP_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": str(master_port_for_job("1234"))}
    assert all(os.environ[k] == v for k, v in values.items())
    # An explicit address/port from the job's setup wins.
    environ.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    assert export_torch_distributed_env(FakeEnv())["MASTER_ADDR"] == "10.0.0.1"
    assert environ["MASTER_PORT"] == "29500"


@pytest.mark.parametrize("job_id", ["7", "14999", "15000", "123456", "987654321"])
def test_submitit_and_srun_launches_derive_the_same_port(monkeypatch, job_id):
    """One job-id-to-port rule: the port submitit's tasks export is the one a plain srun step derives."""

    class FakeEnv:
        global_rank, num_tasks, local_rank, num_nodes, node = 0, 2, 0, 2, 0
        hostnames = ["n1", "n2"]

    FakeEnv.job_id = job_id
    environ = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", environ)
    exported = int(export_torch_distributed_env(FakeEnv())["MASTER_PORT"])
    srun_step = {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                 "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "n[1-2]"}
    derived = dist_info_from_env(srun_step, use_scontrol=False).master_port
    assert exported == derived == master_port_for_job(job_id)
    assert 15000 <= exported < 30000


# ---------------------------------------------------------------------------------------------
# --local: the same entry point through submitit's LocalExecutor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A snapshot of the code the local jobs run: runs compared with each other start a minute
    apart, and edits to the working tree in between must not make them differ."""
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dinoscale", "tools", "configs"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    return root


def _local_cmd(checkout: Path, output_dir: Path, steps: int) -> list[str]:
    return [sys.executable, str(checkout / "tools" / "submit.py"), "--local", "--ngpus", "0", "--timeout", "20",
            "--config", "configs/quickstart.yaml", "--output-dir", str(output_dir),
            f"train.max_steps={steps}", "train.checkpoint_every=100", *TINY]


@pytest.mark.slow
def test_local_run_finishes_with_job_id_expanded(checkout, tmp_path):
    proc = subprocess.run(_local_cmd(checkout, tmp_path / "%j", 4), cwd=checkout, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished at step 4" in proc.stdout
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    run_dir = tmp_path / job_id
    assert f"output dir: {run_dir}" in proc.stdout
    assert [r["step"] for r in metrics_rows(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "step_000000004").is_dir()
    assert (tmp_path / "submitit_logs" / f"{job_id}_0_log.out").exists()
    assert not (tmp_path / "%j").exists()


# Long enough that the signal, sent once 3 steps are logged, lands before the run ends even when the tiny steps
# race ahead while this process polls (14 steps was once too few on a loaded machine).
LOCAL_STEPS = 60


@pytest.fixture(scope="module")
def local_reference(checkout, tmp_path_factory) -> Path:
    """An uninterrupted local run: the losses a preempted one must end with."""
    out = tmp_path_factory.mktemp("local_reference")
    proc = subprocess.run(_local_cmd(checkout, out, LOCAL_STEPS), cwd=checkout, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_local_preemption_checkpoints_requeues_and_matches_uninterrupted_run(checkout, tmp_path, local_reference,
                                                                             signum):
    """USR2 is submitit's time-out notice; SIGTERM is how SLURM preempts (submitit itself only logs it)."""
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(_local_cmd(checkout, run_dir, LOCAL_STEPS), cwd=checkout, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # Signal the training task itself (as SLURM signals every task) once a few steps are done.
        log_dir = run_dir / "submitit_logs"
        deadline = time.monotonic() + 180
        pid = None
        while time.monotonic() < deadline:
            logs = list(log_dir.glob("*_0_log.out"))
            if pid is None and logs and ", pid " in logs[0].read_text():
                pid = int(logs[0].read_text().split(", pid ", 1)[1].split()[0])
            if pid and (run_dir / "metrics.jsonl").exists() and len(metrics_rows(run_dir)) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert pid is not None, "the task never reported its pid"
        os.kill(pid, signum)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"finished at step {LOCAL_STEPS}" in out
    log = next(log_dir.glob("*_0_log.out")).read_text()
    assert f"received {signum.name}" in log and "requeueing (1 of at most" in log, log[-3000:]
    assert "(requeued 1 times)" in log, "the requeued job did not start"
    stopped = int(log.split("checkpoint saved at step ", 1)[1].split()[0])
    assert 3 <= stopped < LOCAL_STEPS
    assert "resumed from" in log.split("(requeued 1 times)", 1)[1]

    got, want = metrics_rows(run_dir), metrics_rows(local_reference)
    assert [r["step"] for r in got] == list(range(1, LOCAL_STEPS + 1))
    for a, b in zip(got, want):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])


# ---------------------------------------------------------------------------------------------
# which stop signal requeues
# ---------------------------------------------------------------------------------------------


class _Env:
    job_id = "77"

    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


@pytest.mark.parametrize(
    "signum, executor, state, requeues",
    [
        (signal.SIGUSR2, "slurm", "COMPLETING", True),  # the time-out notice always requeues
        (signal.SIGUSR1, "slurm", "COMPLETING", True),
        (None, "slurm", "COMPLETING", True),  # another rank got the signal: rank 0 requeues the job
        (signal.SIGTERM, "slurm", "RUNNING", True),  # preemption: the job runs on through the grace time
        (signal.SIGTERM, "slurm", "COMPLETING", False),  # scancel, time limit, a requeue by SLURM: the job ends
        (signal.SIGTERM, "slurm", "CANCELLED", False),
        (signal.SIGTERM, "slurm", None, True),  # scontrol does not answer: requeue (it fails too if SLURM is gone)
        (signal.SIGTERM, "local", None, True),  # the local executor has no scheduler to ask
    ],
)
def test_which_stop_requeues(monkeypatch, signum, executor, state, requeues):
    from dinoscale import launch

    asked = []
    monkeypatch.setattr(launch, "slurm_job_state", lambda job_id: asked.append(job_id) or state)
    assert launch.should_requeue(signum, _Env(executor)) is requeues
    # only a SIGTERM under SLURM asks for the job's state
    assert asked == (["77"] if signum == signal.SIGTERM and executor == "slurm" else [])


def test_slurm_job_state_reads_scontrol(tmp_path, monkeypatch):
    from dinoscale.launch import slurm_job_state

    bindir = tmp_path / "bin"
    bindir.mkdir()
    scontrol = bindir / "scontrol"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    scontrol.write_text('#!/bin/sh\necho "JobId=$4 JobName=x UserId=root(0) JobState=COMPLETING Reason=None Restarts=0"\n')
    scontrol.chmod(0o755)
    assert slurm_job_state("123") == "COMPLETING"
    scontrol.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    assert slurm_job_state("123") is None
