"""FLOP accounting (dinoscale.train.perf.flops): fvcore + our handles, against hand formulas."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.models.factory import build_backbone
from dinoscale.parallel import parallelize
from dinoscale.train.perf import flops

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


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
    model = build_backbone("vit_small", patch_size=p, img_size=img, embed_dim=D, depth=depth, num_heads=4,
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
        model = build_backbone("vit_small", patch_size=4, img_size=16, embed_dim=32, depth=1, num_heads=2, attn_backend=backend)
        counts[backend] = flops.count_forward_flops(model, x)
    # the math path does q k^T and attn v as matmuls (fvcore's handle): same multiply-adds as the sdpa handle
    assert counts["sdpa"] == counts["math"]


def test_compiled_and_checkpointed_blocks_count_like_plain():
    x = torch.randn(2, 3, 16, 16)
    build = lambda: build_backbone("vit_small", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2)  # noqa: E731
    plain = flops.count_forward_flops(build(), x)
    wrapped = parallelize(build(), mesh=None, activation_checkpointing=True, compile_blocks=True,
                          compile_options={"backend": "eager"})
    assert flops.count_forward_flops(wrapped, x) == plain
    # the compiled wrappers are back in place afterwards
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in wrapped.blocks)


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


# ------------------------------------------------------------------------------------------- process groups


def _count_on_rank0_worker(rank, world_size, port, out_dir, overrides):
    from pathlib import Path

    from dinoscale import distributed as D

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        del os.environ[name]
    D.init_distributed(backend="gloo", timeout_s=60, arrival_timeout_s=60)
    try:
        cfg = load_config("quickstart", overrides + ["dino.koleo_distributed=true"])
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
def test_count_needs_no_other_rank(tmp_path, tiny_overrides):
    import torch.multiprocessing as mp

    from dinoscale import distributed as D

    mp.spawn(_count_on_rank0_worker, args=(2, D.find_free_port(), str(tmp_path), tiny_overrides), nprocs=2)
    parts = json.loads((tmp_path / "parts.json").read_text())
    cfg = load_config("quickstart", tiny_overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    batch = flops.example_batch(method, patch_size=4, batch_size=4, image_size=32)
    single = flops.flops_breakdown(method, student, teacher, batch, use_cache=False)
    assert parts["step"] == single["step"]
