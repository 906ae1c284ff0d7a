"""Achieved FLOP/s and MFU (dinoscale.train.perf.meter): the meter's window, the helper that looks up the count
and the peak, and a real FSDP2 step measured with them."""

import json
import os
import time

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.train.perf import peak
from dinoscale.train.perf.flops import example_batch, step_flops
from dinoscale.train.perf.meter import ThroughputMeter, throughput_meter
from dinoscale.train.perf.peak import peak_flops

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def test_throughput_meter(monkeypatch):
    clock = iter([100.0, 101.0, 102.0, 104.0, 108.0, 150.0, 151.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(2e12, 10e12, window=2)  # created at t=100
    assert meter.stats() == {"tflops_per_s": 0.0, "mfu": 0.0}
    meter.update()  # t=101: 1 step in 1 s
    assert meter.stats() == {"tflops_per_s": pytest.approx(2.0), "mfu": pytest.approx(0.2)}
    meter.update()  # t=102
    meter.update()  # t=104: window holds the steps ending at 102 and 104 -> 2 steps in 3 s
    assert meter.stats()["tflops_per_s"] == pytest.approx(4.0 / 3.0)
    meter.update()  # t=108: steps ending at 104 and 108 -> 2 steps in 6 s
    assert meter.stats()["mfu"] == pytest.approx(4e12 / 6 / 10e12)
    meter.restart()  # t=150: e.g. after a checkpoint; its 42 s are not step time
    assert meter.stats() == {"tflops_per_s": 0.0, "mfu": 0.0}
    meter.update()  # t=151: 1 step in 1 s
    assert meter.stats()["tflops_per_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="flops_per_step"):
        ThroughputMeter(0, 1)
    with pytest.raises(ValueError, match="window"):
        ThroughputMeter(1, 1, window=0)


def test_throughput_meter_helper_warns_instead_of_failing(tiny_dinov2, tmp_path, monkeypatch, caplog):
    _cfg, method, student, teacher, batch = tiny_dinov2
    monkeypatch.setitem(peak._PROBE_SIZE, "cpu", 128)
    monkeypatch.setattr(peak, "default_cache_path", lambda: tmp_path / "peak.json")
    meter = throughput_meter(method, student, teacher, batch, device="cpu", dtype=torch.float32, window=5)
    assert meter.flops_per_step == step_flops(method, student, teacher, batch)
    assert meter.peak_flops_per_s == json.loads((tmp_path / "peak.json").read_text()).popitem()[1]

    class Untraceable(torch.nn.Module):
        def forward(self, student, teacher, batch, sched):
            n = batch["global_crops"].shape[0] // 2  # a tensor under JIT tracing
            return student["backbone"](batch["global_crops"][: round(n)]).sum(), {}

    with pytest.raises(RuntimeError, match="int\\(\\) first"):
        step_flops(Untraceable(), student, None, batch)
    with caplog.at_level("WARNING", logger="dinoscale"):
        assert throughput_meter(Untraceable(), student, None, batch, device="cpu", dtype=torch.float32) is None
    assert "no tflops_per_s / mfu" in caplog.text


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_bf16_fsdp_step_on_gpu(tmp_path, tiny_overrides):
    """One DINOv2 step on CUDA through FSDP2 (1 rank, bf16 params, fused AdamW), FLOPs counted first."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = _run_fsdp_step("cuda", tmp_path, tiny_overrides)
    assert result["fused"]
    assert result["peak_source"].startswith("table")  # a data-sheet card; else the probe would have run


@pytest.mark.distributed
def test_bf16_fsdp_step_on_cpu(tmp_path, tiny_overrides):
    """The same step on CPU (gloo): the GPU test's logic, checked where no GPU is."""
    result = _run_fsdp_step("cpu", tmp_path, tiny_overrides)
    assert result["fused"]  # torch's fused AdamW runs on CPU too (and on FSDP2 shards)


def _run_fsdp_step(device_type, tmp_path, overrides):
    import torch.multiprocessing as mp

    from dinoscale import distributed as D

    mp.spawn(_fsdp_step_worker, args=(device_type, D.find_free_port(), str(tmp_path), overrides), nprocs=1)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["finite"] and result["changed"] and result["teacher_moved"], result
    assert result["sharded"]
    assert 0 < result["mfu"] < 1, result
    assert result["param_dtype_in_forward"] == "torch.bfloat16"
    return result


def _fsdp_step_worker(rank, device_type, port, out_dir, overrides):
    from pathlib import Path

    from dinoscale import distributed as D
    from dinoscale.parallel import build_mesh, parallelize_student_teacher
    from dinoscale.train.optim import build_optimizer, get_param_groups
    from dinoscale.train.teacher import ema_update_, init_teacher_from_student_

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    torch.set_num_threads(1)
    D.init_distributed(backend="nccl" if device_type == "cuda" else "gloo", arrival_timeout_s=60)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        cfg = load_config("quickstart", overrides)
        torch.manual_seed(0)
        method = build_method(cfg).to(device)
        student, teacher = method.build_networks()
        init_teacher_from_student_(teacher, student)
        student.to(device), teacher.to(device)
        batch = example_batch(method, patch_size=4, batch_size=8, image_size=32, device=device)
        flops_per_step = step_flops(method, student, teacher, batch)  # before sharding
        parallelize_student_teacher(student, teacher, mesh=build_mesh(hybrid_shard=False),
                                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        optimizer = build_optimizer(get_param_groups(student, n_blocks=student["backbone"].n_blocks))
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = 1e-3, 0.04
        seen = {}

        def record_dtype(module, args):  # returns None: the inputs stay as they are
            seen.setdefault("dtype", str(module.weight.dtype))

        hook = student["backbone"].blocks[0].attn.qkv.register_forward_pre_hook(record_dtype)
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        before = {k: full(v).clone() for k, v in student.state_dict().items()}
        teacher_before = {k: full(v).clone() for k, v in teacher.state_dict().items()}
        peak_per_s, source = peak_flops(device, torch.bfloat16, cache_path=Path(out_dir, "peak.json"))
        meter = ThroughputMeter(flops_per_step, peak_per_s, window=3)
        sched = {"teacher_temp": 0.07}
        finite = True
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _ = method(student, teacher, batch, sched)
            loss.backward()
            optimizer.step()
            ema_update_(teacher, student, 0.9)
            finite = finite and bool(torch.isfinite(loss).item())  # a test: one sync per step is fine
            meter.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        hook.remove()
        after = {k: full(v) for k, v in student.state_dict().items()}
        teacher_after = {k: full(v) for k, v in teacher.state_dict().items()}
        result = {
            "finite": finite,
            "sharded": all(hasattr(p, "full_tensor") for p in student.parameters()),
            "changed": any(not torch.equal(before[k], after[k]) for k in before),
            "teacher_moved": any(not torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before),
            "fused": bool(optimizer.defaults.get("fused")),
            "mfu": meter.stats()["mfu"],
            "peak_source": source,
            "param_dtype_in_forward": seen.get("dtype"),
        }
        Path(out_dir, "result.json").write_text(json.dumps(result))
    finally:
        D.destroy_distributed()


# ------------------------------------------------------------------------------------------ benchmarks/gpu.sh


@pytest.mark.slow
def test_gpu_script_parses_and_dry_runs(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path), "--commit", "e68dcbd"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # env.txt names the caller's commit, not what .git says, and the digest of the files that would run
    env = (tmp_path / "env.txt").read_text()
    assert "commit: e68dcbd (given with --commit)" in env, env
    digest = next(line for line in env.splitlines() if line.startswith("source digest: "))
    assert len(digest.split()[2]) == len("sha256:") + 64, digest
    plan = (tmp_path / "summary.txt").read_text()
    assert "-m pytest -m gpu" in plan and "--configs vitl14" in plan
    assert "bf16-eager" in plan and "bf16-compiled" in plan
    # the gpu tests it would run are collected on this machine
    assert "test_xformers_matches_sdpa_on_cuda" in plan and "test_bf16_fsdp_step_on_gpu" in plan
    # every requirement is checked (and recorded) before anything runs
    assert "check_requirements: all" in env, env
    # --wheels: a folder without wheels is refused at once, with the command that makes them
    (tmp_path / "empty").mkdir()
    bad = subprocess.run(["bash", str(script), "--dry-run", "--wheels", str(tmp_path / "empty")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "gpu_wheels.sh" in bad.stderr, bad.stderr
    bad = subprocess.run(["bash", str(script), "--wheels"], capture_output=True, text=True)
    assert bad.returncode == 2 and "needs a directory" in bad.stderr
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    bad = subprocess.run(["bash", str(script), "--commit", "HEAD~1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "commit id" in bad.stderr
    # without --commit the run goes on, loudly unverified
    done = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path / "no_commit")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "WARNING: no --commit" in done.stderr
    assert "commit: unverified" in (tmp_path / "no_commit" / "env.txt").read_text()


def test_throughput_meter_warns_once_when_above_the_peak(monkeypatch, caplog):
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(2e12, 1e12, window=1)  # 2 TFLOP per step, 1 s per step, a 1 TFLOP/s "peak"
    with caplog.at_level("WARNING", logger="dinoscale"):
        meter.update()
        assert meter.stats()["mfu"] == pytest.approx(2.0)
        meter.update()
        meter.stats()
    assert len(caplog.records) == 1 and "above 1" in caplog.records[0].message
