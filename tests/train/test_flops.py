"""FLOP accounting (fvcore + our handles), the peak FLOP/s table and probe, and the throughput meter."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.models import vit
from dinoscale.parallel import parallelize
from dinoscale.train import flops

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.img_size=16",
    "model.drop_path_rate=0.1",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=48", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=48", "ibot.head_bottleneck_dim=16",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
]


def vit_forward_formula(B, img, p, D, depth, mlp_ratio=4, registers=0, in_chans=3):
    """FLOPs (2 per multiply-add) of a ViT forward, matrix products only, by hand."""
    N = (img // p) ** 2
    T = 1 + registers + N
    macs = B * N * D * in_chans * p * p  # patch embedding
    per_block = B * T * D * 3 * D + B * T * D * D + 2 * B * T * D * mlp_ratio * D  # qkv, proj, fc1 + fc2
    per_block += 2 * B * T * T * D  # q k^T and attn v over all heads
    return 2 * (macs + depth * per_block)


def layer_norm_count(B, T, D, depth):
    """fvcore's estimate for the 2 * depth + 1 affine LayerNorms: 5 per element (times 2, our FLOP unit)."""
    return 2 * 5 * B * T * D * (2 * depth + 1)


@pytest.mark.parametrize("registers", [0, 2])
def test_vit_forward_matches_hand_formula(registers):
    B, img, p, D, depth = 3, 32, 8, 48, 2
    model = vit.vit_small(patch_size=p, img_size=img, embed_dim=D, depth=depth, num_heads=4,
                          num_register_tokens=registers, init_values=1e-5)
    counted = flops.count_forward_flops(model, torch.randn(B, 3, img, img))
    matmuls = vit_forward_formula(B, img, p, D, depth, registers=registers)
    T = 1 + registers + (img // p) ** 2
    assert counted == pytest.approx(matmuls + layer_norm_count(B, T, D, depth), rel=1e-9)
    assert counted == pytest.approx(matmuls, rel=0.03)  # norms are a small share


def test_sdpa_handle_counts_4_b_h_n2_d():
    class OnlySDPA(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    B, H, N, d = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    assert flops.count_forward_flops(OnlySDPA(), q, k, v) == 4 * B * H * N * N * d
    # cross-attention with a different value width: 2 * B * H * Nq * Nk * (d_qk + d_v)
    k2, v2 = torch.randn(B, H, 5, d), torch.randn(B, H, 5, 16)
    assert flops.count_forward_flops(OnlySDPA(), q, k2, v2) == 2 * B * H * N * 5 * (d + 16)


def test_attention_backends_count_the_same(monkeypatch):
    x = torch.randn(2, 3, 16, 16)
    counts = {}
    for backend in ("sdpa", "math"):
        model = vit.vit_small(patch_size=4, img_size=16, embed_dim=32, depth=1, num_heads=2, attn_backend=backend)
        counts[backend] = flops.count_forward_flops(model, x)
    # the math path does q k^T and attn v as matmuls (fvcore's handle): same multiply-adds as the sdpa handle
    assert counts["sdpa"] == counts["math"]


def test_compiled_and_checkpointed_blocks_count_like_plain():
    x = torch.randn(2, 3, 16, 16)
    build = lambda: vit.vit_small(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2)  # noqa: E731
    plain = flops.count_forward_flops(build(), x)
    wrapped = parallelize(build(), mesh=None, activation_checkpointing=True, compile_blocks=True,
                          compile_options={"backend": "eager"})
    assert flops.count_forward_flops(wrapped, x) == plain
    # the compiled wrappers are back in place afterwards
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in wrapped.blocks)


@pytest.fixture()
def tiny_dinov2():
    flops.clear_flops_cache()
    cfg = load_config("quickstart", TINY)
    torch.manual_seed(0)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    batch = flops.example_batch(method, patch_size=4, batch_size=4, image_size=32)
    return cfg, method, student, teacher, batch


def _student_and_teacher_by_hand(student, teacher, batch):
    """Forward FLOPs of the DINOv2 networks on this batch, counted module by module (no method code)."""
    g, loc = batch["global_crops"], batch["local_crops"]
    n_masked = batch["mask_indices"].shape[0]
    D = student["backbone"].embed_dim

    class Backbone(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *xs):
            outs = self.net(list(xs), is_training=True)
            return [t for o in outs for t in (o["x_norm_clstoken"], o["x_norm_patchtokens"])]

    s_backbone = flops.count_forward_flops(Backbone(student["backbone"]), g, loc)
    t_backbone = flops.count_forward_flops(Backbone(teacher["backbone"]), g)
    # (the trace keeps only ops that reach an output, hence the normalised tokens are returned)
    # heads: student sees the CLS of all crops and the masked patches, the teacher the global CLS and patches
    s_head = flops.count_forward_flops(student["dino_head"], torch.randn(g.shape[0] + loc.shape[0] + n_masked, D))
    t_head = flops.count_forward_flops(teacher["dino_head"], torch.randn(g.shape[0] + n_masked, D))
    return s_backbone + s_head, t_backbone + t_head


def test_step_counts_student_teacher_and_backward_twice(tiny_dinov2):
    _cfg, method, student, teacher, batch = tiny_dinov2
    parts = flops.flops_breakdown(method, student, teacher, batch)
    assert parts["unsupported_ops"] == {}, parts["unsupported_ops"]
    student_fwd, teacher_fwd = _student_and_teacher_by_hand(student, teacher, batch)
    assert parts["student_forward"] == pytest.approx(student_fwd, rel=1e-9)
    assert parts["teacher_forward"] == pytest.approx(teacher_fwd, rel=1e-9)
    # the losses hold only the KoLeo nearest-neighbour products (tiny) besides pointwise ops
    assert 0 <= parts["other_forward"] < 0.01 * parts["student_forward"]
    # backward = 2 x forward for everything but the teacher
    assert parts["step"] == pytest.approx(3 * (student_fwd + parts["other_forward"]) + teacher_fwd, rel=1e-9)
    assert flops.step_flops(method, student, teacher, batch) == parts["step"]


def test_counting_changes_nothing(tiny_dinov2):
    _cfg, method, student, teacher, batch = tiny_dinov2
    centers = {k: v.clone() for k, v in method.state_dict().items()}
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    flops.step_flops(method, student, teacher, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in method.state_dict().items():
        assert torch.equal(v, centers[k]), k
    for k, v in student.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for p in student.parameters())


def test_cache_hits_on_second_call_and_misses_on_new_shapes(tiny_dinov2, monkeypatch):
    _cfg, method, student, teacher, batch = tiny_dinov2
    first = flops.flops_breakdown(method, student, teacher, batch)

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again although the configuration is cached")

    monkeypatch.setattr(flops, "_analysis", no_trace)
    # a new batch of the same configuration (other masks) is served from the cache
    other = flops.example_batch(method, patch_size=4, batch_size=4, image_size=32, seed=1)
    assert flops.flops_breakdown(method, student, teacher, other) is first
    monkeypatch.undo()
    # more images per step: a new entry, and the count grows accordingly
    bigger = flops.example_batch(method, patch_size=4, batch_size=8, image_size=32)
    assert flops.step_flops(method, student, teacher, bigger) > 1.8 * first["step"]


def test_method_without_teacher_and_sharded_networks_are_handled(tiny_dinov2, monkeypatch):
    _cfg, method, student, teacher, batch = tiny_dinov2

    class NoTeacherMethod(torch.nn.Module):
        def forward(self, student, teacher, batch, sched):
            assert teacher is None
            out = student["backbone"](batch["global_crops"], is_training=True)["x_norm_clstoken"]
            return student["dino_head"](out).float().square().mean(), {}

    parts = flops.flops_breakdown(NoTeacherMethod(), student, None, batch)
    assert parts["teacher_forward"] == 0
    assert parts["step"] == pytest.approx(3 * (parts["student_forward"] + parts["other_forward"]))

    # FSDP2 shards are DTensors: refused with a message saying to count before parallelize
    monkeypatch.setattr(flops, "_is_dtensor", lambda t: True)
    with pytest.raises(ValueError, match="FSDP shard"):
        flops.flops_breakdown(method, student, teacher, batch, use_cache=False)


def test_example_batch_has_training_shapes(tiny_dinov2):
    cfg, method, *_ , batch = tiny_dinov2
    assert batch["global_crops"].shape == (8, 3, 16, 16)
    assert batch["local_crops"].shape == (2 * 4, 3, 8, 8)
    assert batch["masks"].shape == (8, 16) and batch["masks"].dtype == torch.bool
    assert batch["global_crops"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------- peak FLOP/s


def test_cpu_peak_probe_is_positive_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    monkeypatch.setitem(flops._PROBE_SIZE, "cpu", 256)  # the real probe uses 2048; the logic is the same
    value, source = flops.peak_flops("cpu", torch.float32, cache_path=cache)
    assert value > 0 and "measured now" in source
    stored = json.loads(cache.read_text())
    (key,) = stored
    assert key.endswith("|fp32") and f"threads={torch.get_num_threads()}" in key
    assert stored[key] == value

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again although the figure is cached")

    monkeypatch.setattr(flops, "_measure_matmul", no_probe)
    again, source = flops.peak_flops("cpu", torch.float32, cache_path=cache)
    assert again == value and "cached" in source
    # another dtype is another entry
    monkeypatch.undo()
    monkeypatch.setitem(flops._PROBE_SIZE, "cpu", 256)
    bf16, _ = flops.peak_flops("cpu", torch.bfloat16, cache_path=cache)
    assert bf16 > 0 and len(json.loads(cache.read_text())) == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H200", torch.float16, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A10", torch.bfloat16, 125e12),
        ("NVIDIA L40S", torch.float32, 91.6e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
    ],
)
def test_gpu_table(monkeypatch, tmp_path, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    value, source = flops.peak_flops("cuda", dtype, cache_path=tmp_path / "unused.json")
    assert value == expected and source.startswith("table") and name in source
    assert not (tmp_path / "unused.json").exists()


def test_gpu_table_uses_tf32_when_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert flops.peak_flops("cuda", torch.float32)[0] == 156e12
        torch.set_float32_matmul_precision("highest")
        assert flops.peak_flops("cuda", torch.float32)[0] == 19.5e12
    finally:
        torch.set_float32_matmul_precision(previous)


def test_peak_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        flops.peak_flops("cpu", torch.int8)
    with pytest.raises(ValueError, match="device type"):
        flops.peak_flops("meta", torch.float32)


# ------------------------------------------------------------------------------------------------ throughput


def test_throughput_meter(monkeypatch):
    clock = iter([100.0, 101.0, 102.0, 104.0, 108.0, 150.0, 151.0])
    monkeypatch.setattr(flops.time, "perf_counter", lambda: next(clock))
    meter = flops.ThroughputMeter(2e12, 10e12, window=2)  # created at t=100
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
        flops.ThroughputMeter(0, 1)
    with pytest.raises(ValueError, match="window"):
        flops.ThroughputMeter(1, 1, window=0)


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_bf16_fsdp_step_on_gpu(tmp_path):
    """One DINOv2 step on CUDA through FSDP2 (1 rank, bf16 params, fused AdamW), FLOPs counted first."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = _run_fsdp_step("cuda", tmp_path)
    assert result["fused"]
    assert result["peak_source"].startswith("table")  # a data-sheet card; else the probe would have run


@pytest.mark.distributed
def test_bf16_fsdp_step_on_cpu(tmp_path):
    """The same step on CPU (gloo): the GPU test's logic, checked where no GPU is."""
    result = _run_fsdp_step("cpu", tmp_path)
    assert result["fused"]  # torch's fused AdamW runs on CPU too (and on FSDP2 shards)


def _run_fsdp_step(device_type, tmp_path):
    import torch.multiprocessing as mp

    from dinoscale import distributed as D

    mp.spawn(_fsdp_step_worker, args=(device_type, D.find_free_port(), str(tmp_path)), nprocs=1)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["finite"] and result["changed"] and result["teacher_moved"], result
    assert result["sharded"]
    assert 0 < result["mfu"] < 1, result
    assert result["param_dtype_in_forward"] == "torch.bfloat16"
    return result


def _fsdp_step_worker(rank, device_type, port, out_dir):
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
        cfg = load_config("quickstart", TINY)
        torch.manual_seed(0)
        method = build_method(cfg).to(device)
        student, teacher = method.build_networks()
        init_teacher_from_student_(teacher, student)
        student.to(device), teacher.to(device)
        batch = flops.example_batch(method, patch_size=4, batch_size=8, image_size=32, device=device)
        step_flops = flops.step_flops(method, student, teacher, batch)  # before sharding
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
        peak, source = flops.peak_flops(device, torch.bfloat16, cache_path=Path(out_dir, "peak.json"))
        meter = flops.ThroughputMeter(step_flops, peak, window=3)
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


# ------------------------------------------------------------------------------------------- process groups


def _count_on_rank0_worker(rank, world_size, port, out_dir):
    from pathlib import Path

    from dinoscale import distributed as D

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    D.init_distributed(backend="gloo", timeout_s=60, arrival_timeout_s=60)
    try:
        cfg = load_config("quickstart", TINY + ["dino.koleo_distributed=true"])
        torch.manual_seed(0)
        method = build_method(cfg)
        student, teacher = method.build_networks()
        if rank == 0:  # a rank counting alone must not wait for the others' collectives
            batch = flops.example_batch(method, patch_size=4, batch_size=4, image_size=32)
            parts = flops.flops_breakdown(method, student, teacher, batch)
            Path(out_dir, "parts.json").write_text(json.dumps(parts))
        D.barrier()
        assert D.is_enabled() and D.get_world_size() == world_size  # restored after counting
    finally:
        D.destroy_distributed()


@pytest.mark.distributed
def test_count_needs_no_other_rank(tmp_path):
    import torch.multiprocessing as mp

    from dinoscale import distributed as D

    mp.spawn(_count_on_rank0_worker, args=(2, D.find_free_port(), str(tmp_path)), nprocs=2)
    parts = json.loads((tmp_path / "parts.json").read_text())
    cfg = load_config("quickstart", TINY)
    torch.manual_seed(0)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    batch = flops.example_batch(method, patch_size=4, batch_size=4, image_size=32)
    single = flops.flops_breakdown(method, student, teacher, batch, use_cache=False)
    assert parts["step"] == single["step"]


# ------------------------------------------------------------------------------------------ benchmarks/gpu.sh


@pytest.mark.slow
def test_gpu_script_parses_and_dry_runs(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = (tmp_path / "summary.txt").read_text()
    assert "-m pytest -m gpu" in plan and "--configs vitl14" in plan
    assert "bf16-eager" in plan and "bf16-compiled" in plan
    # the gpu tests it would run are collected on this machine
    assert "test_xformers_matches_sdpa_on_cuda" in plan and "test_bf16_fsdp_step_on_gpu" in plan
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_throughput_meter_helper_warns_instead_of_failing(tiny_dinov2, tmp_path, monkeypatch, caplog):
    _cfg, method, student, teacher, batch = tiny_dinov2
    monkeypatch.setitem(flops._PROBE_SIZE, "cpu", 128)
    monkeypatch.setattr(flops, "default_cache_path", lambda: tmp_path / "peak.json")
    meter = flops.throughput_meter(method, student, teacher, batch, device="cpu", dtype=torch.float32, window=5)
    assert meter.flops_per_step == flops.step_flops(method, student, teacher, batch)
    assert meter.peak_flops_per_s == json.loads((tmp_path / "peak.json").read_text()).popitem()[1]

    class Untraceable(torch.nn.Module):
        def forward(self, student, teacher, batch, sched):
            n = batch["global_crops"].shape[0] // 2  # a tensor under JIT tracing
            return student["backbone"](batch["global_crops"][: round(n)]).sum(), {}

    with pytest.raises(RuntimeError, match="int\\(\\) first"):
        flops.step_flops(Untraceable(), student, None, batch)
    with caplog.at_level("WARNING", logger="dinoscale"):
        assert flops.throughput_meter(Untraceable(), student, None, batch, device="cpu", dtype=torch.float32) is None
    assert "no tflops_per_s / mfu" in caplog.text
