"""FSDP2 / activation checkpointing / compile applied by dinoscale.parallel.

Multi-process tests run 2 gloo ranks on CPU and compare against the unsharded model on the same
global batch (each rank holds half of it; FSDP averages the gradients over ranks)."""

import copy
import json
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from dinoscale import distributed as D
from dinoscale.models.heads import DINOHead
from dinoscale.models.factory import build_backbone
from dinoscale.parallel import (
    CHECKPOINT_PREFIX,
    SELECTIVE_AC_SAVED_OPS,
    activation_checkpointing_mode,
    build_mesh,
    parallelize,
    parallelize_student_teacher,
    strip_wrapper_prefixes,
)
from dinoscale.train.teacher import ema_update_

IMG = 32
PATCH = 8
DIM = 32


def _tiny_vit(**kwargs):
    return build_backbone("vit_small", patch_size=PATCH, img_size=IMG, embed_dim=DIM, depth=2, num_heads=2, num_register_tokens=1, **kwargs)


def _head():
    """A small DINO head: no ``blocks``, so it is sharded as one unit."""
    return DINOHead(in_dim=DIM, out_dim=64, hidden_dim=48, bottleneck_dim=16, nlayers=3)


def _crops(generator, batch):
    """A multi-crop batch: 2 global-size and 1 local-size crop tensors, as a list."""
    return [
        torch.randn(batch, 3, IMG, IMG, generator=generator),
        torch.randn(batch, 3, IMG, IMG, generator=generator),
        torch.randn(batch, 3, IMG // 2, IMG // 2, generator=generator),
    ]


def _loss(backbone, head, crops):
    """Mean over samples (so averaging two half-batch losses gives the full-batch loss)."""
    outs = backbone(crops, is_training=True)
    total = 0.0
    for o in outs:
        total = total + head(o["x_norm_clstoken"]).float().pow(2).sum(-1).mean()
        total = total + 0.1 * o["x_norm_patchtokens"].float().pow(2).mean()
    return total / len(outs)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _named_grads(module):
    """Full gradients by plain name; parameters without a gradient (the unused mask token) are left out."""
    return {
        strip_wrapper_prefixes(n): _full(p.grad).detach().clone()
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def _max_diff(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- single process


def test_without_process_group_module_is_unchanged():
    assert not D.is_enabled()
    assert build_mesh(hybrid_shard=False) is None
    model = _tiny_vit()
    names = [n for n, _ in model.named_parameters()]
    out = parallelize(model, mesh=None, param_dtype=torch.bfloat16)
    assert out is model
    assert [n for n, _ in model.named_parameters()] == names
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("mode", [True, "selective"], ids=["full", "selective"])
@pytest.mark.parametrize("list_input", [True, False])
def test_activation_checkpointing_preserves_outputs_and_grads(list_input, mode):
    torch.manual_seed(0)
    # stochastic depth on: the recomputation must redraw the same drop masks
    ref = _tiny_vit(drop_path_rate=0.3, drop_path_uniform=True).train()
    ac = copy.deepcopy(ref)
    parallelize(ac, mesh=None, activation_checkpointing=mode)
    names = [n for n, _ in ac.named_parameters()]
    assert any(CHECKPOINT_PREFIX in n for n in names)
    # state_dict keys stay plain, so checkpoints load into an unwrapped model
    assert list(ac.state_dict().keys()) == list(ref.state_dict().keys())
    assert ac.blocks[0].__class__.__name__ == "CheckpointWrapper"

    g = torch.Generator().manual_seed(1)
    crops = _crops(g, 4)
    x = crops if list_input else crops[0]
    head = _head()

    def loss_of(model):
        torch.manual_seed(123)
        out = model(x, is_training=True)
        outs = out if list_input else [out]
        return sum(head(o["x_norm_clstoken"]).pow(2).mean() + o["x_norm_patchtokens"].pow(2).mean() for o in outs)

    loss_ref, loss_ac = loss_of(ref), loss_of(ac)
    loss_ref.backward()
    loss_ac.backward()
    assert torch.allclose(loss_ref, loss_ac, rtol=0, atol=1e-6)
    assert _max_diff(_named_grads(ref), _named_grads(ac)) < 1e-6
    if mode == "selective":  # fp32 on one CPU thread recomputes the same bits: bitwise, not only close
        assert torch.equal(loss_ref, loss_ac) and _max_diff(_named_grads(ref), _named_grads(ac)) == 0


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that run while it is active (by overload packet name, e.g. ``addmm``)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_only_what_it_does_not_keep():
    # Forward ops that run again in backward are recomputed. A linear layer's forward is addmm (its backward
    # runs mm), so addmm in backward means matmuls were recomputed; layer norm, GELU and the attention softmax
    # are forward ops too. No AC recomputes nothing, full AC everything, selective all but the matmuls.
    torch.set_num_threads(1)
    x = _crops(torch.Generator().manual_seed(1), 2)
    recomputed = {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = parallelize(_tiny_vit(), mesh=None, activation_checkpointing=mode)
        loss = sum(o["x_norm_patchtokens"].pow(2).mean() for o in model(x, is_training=True))
        counter = _OpCounter()
        with counter:
            loss.backward()
        recomputed[mode] = {op: counter.counts.get(op, 0)
                            for op in ("addmm", "native_layer_norm", "gelu", "_softmax")}
    assert set(recomputed["none"].values()) == {0}, recomputed
    assert all(n > 0 for n in recomputed["full"].values()), recomputed
    blocks = len(model.blocks)
    sel = recomputed["selective"]
    assert sel["addmm"] == 0, recomputed  # kept: qkv, proj, fc1, fc2 are not run again
    assert sel["native_layer_norm"] == 2 * blocks and sel["gelu"] == blocks, recomputed  # recomputed once each
    assert sel["_softmax"] == recomputed["full"]["_softmax"] > 0, recomputed  # matmul attention's softmax


def test_selective_checkpointing_keeps_matmul_attention_and_reduce_scatter_outputs():
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default,
               aten._scaled_dot_product_flash_attention.default,
               aten._scaled_dot_product_efficient_attention.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default,
               torch.ops._c10d_functional.reduce_scatter_tensor.default):
        assert op in SELECTIVE_AC_SAVED_OPS, op
    for op in (aten.native_layer_norm.default, aten.gelu.default, aten.add.Tensor, aten._softmax.default):
        assert op not in SELECTIVE_AC_SAVED_OPS, op


def test_activation_checkpointing_modes_and_their_earlier_boolean_form():
    assert [activation_checkpointing_mode(v) for v in (False, None, True, "none", "full", "Selective")] == [
        "none", "none", "full", "none", "full", "selective"]
    with pytest.raises(ValueError, match=r"one of \('none', 'full', 'selective'\)"):
        activation_checkpointing_mode("sometimes")
    with pytest.raises(ValueError, match="one of"):
        parallelize(_tiny_vit(), mesh=None, activation_checkpointing="yes")
    plain = _tiny_vit()
    parallelize(plain, mesh=None, activation_checkpointing="none")
    assert not any(CHECKPOINT_PREFIX in n for n, _ in plain.named_parameters())
    student = nn.ModuleDict({"backbone": _tiny_vit(), "head": _head()})
    teacher = copy.deepcopy(student)
    parallelize_student_teacher(student, teacher, mesh=None, activation_checkpointing="selective")
    assert student["backbone"].blocks[0].__class__.__name__ == "CheckpointWrapper"
    assert not any(CHECKPOINT_PREFIX in n for n, _ in [*student["head"].named_parameters(),
                                                       *teacher.named_parameters()])


def test_compile_blocks_in_place_keeps_names_and_outputs():
    torch.manual_seed(0)
    ref = _tiny_vit()
    comp = copy.deepcopy(ref)
    parallelize(comp, mesh=None, compile_blocks=True, compile_options={"backend": "aot_eager"})
    assert [n for n, _ in comp.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(b._compiled_call_impl is not None for b in comp.blocks)
    crops = _crops(torch.Generator().manual_seed(2), 2)
    for a, b in zip(ref(crops, is_training=True), comp(crops, is_training=True)):
        assert torch.allclose(a["x_norm_clstoken"], b["x_norm_clstoken"], atol=1e-6)


def test_compile_blocks_gives_every_block_a_graph():
    """Past dynamo's recompile limit (8) blocks would run eagerly; parallelize raises the limit.

    specialize_float=True makes each block's stochastic-depth rate a guarded constant, as seen on CUDA
    (torch 2.11: a 24-block ViT-L compiled 8 blocks), so 12 blocks need 12 graphs.

    dynamo's own ``config.patch`` restores its settings: pytest's monkeypatch deletes ``recompile_limit`` on
    undo (an alias of ``cache_size_limit`` in torch 2.14), which broke every later compile in the session.
    """
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(specialize_float=True, recompile_limit=8):
        torch._dynamo.reset()
        counters.clear()
        model = build_backbone("vit_small", patch_size=PATCH, img_size=IMG, embed_dim=DIM, depth=12, num_heads=2, drop_path_rate=0.3)
        parallelize(model, mesh=None, compile_blocks=True, compile_options={"backend": "aot_eager"})
        model.train()
        model(torch.randn(2, 3, IMG, IMG), is_training=True)
        assert counters["stats"]["unique_graphs"] == 12
    torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit >= 8  # still there for the tests that follow


@pytest.mark.slow
def test_compile_blocks_with_inductor_and_checkpointing():
    torch.manual_seed(0)
    ref = _tiny_vit()
    comp = copy.deepcopy(ref)
    parallelize(comp, mesh=None, activation_checkpointing=True, compile_blocks=True)
    x = torch.randn(2, 3, IMG, IMG)
    ref(x).pow(2).sum().backward()
    comp(x).pow(2).sum().backward()
    # inductor fuses and reorders float ops: equal up to fp32 round-off, not bitwise
    assert _max_diff(_named_grads(ref), _named_grads(comp)) < 1e-4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="activation_checkpointing needs a module with .blocks"):
        parallelize(_head(), mesh=None, activation_checkpointing=True)

    class NotAList(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"0": nn.Linear(2, 2)})  # a list (or timm's nn.Sequential) is expected

    with pytest.raises(TypeError, match="ModuleList"):
        parallelize(NotAList(), mesh=None)
    with pytest.raises(TypeError, match="nn.Module"):
        parallelize("model", mesh=None)
    with pytest.raises(ValueError, match="compile_blocks=False"):
        parallelize(_tiny_vit(), mesh=None, compile_options={"backend": "eager"})
    twice = _tiny_vit()
    parallelize(twice, mesh=None, activation_checkpointing=True)
    with pytest.raises(ValueError, match="already activation-checkpointed"):
        parallelize(twice, mesh=None, activation_checkpointing=True)
    with pytest.raises(ValueError, match="different parts"):
        parallelize_student_teacher(
            nn.ModuleDict({"backbone": _tiny_vit(), "head": _head()}),
            nn.ModuleDict({"backbone": _tiny_vit()}),
            mesh=None,
        )


def test_student_teacher_single_process_freezes_teacher():
    student = nn.ModuleDict({"backbone": _tiny_vit(), "head": _head()})
    teacher = copy.deepcopy(student)
    parallelize_student_teacher(student, teacher, mesh=None, activation_checkpointing=True)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(CHECKPOINT_PREFIX in n for n, _ in student.named_parameters())
    assert not any(CHECKPOINT_PREFIX in n for n, _ in teacher.named_parameters())


# ----------------------------------------------------------------------------- 2 processes


def _init(rank, world_size, port):
    torch.set_num_threads(1)
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
    return D.init_distributed(arrival_timeout_s=60)


def _spawn(fn, tmp_path, world_size=2, *extra):
    mp.spawn(fn, args=(world_size, D.find_free_port(), str(tmp_path), *extra), nprocs=world_size)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


PARITY_CONFIGS = {
    "full_shard": dict(hybrid_shard=False),
    "full_shard_ac_compile_keep_gathered": dict(
        hybrid_shard=False,
        activation_checkpointing=True,
        compile_blocks=True,
        compile_options={"backend": "aot_eager"},
        reshard_after_forward=False,
    ),
    "full_shard_selective_ac": dict(hybrid_shard=False, activation_checkpointing="selective"),
    "hybrid_2x1": dict(hybrid_shard=True, devices_per_node=1),
    "hybrid_1x2": dict(hybrid_shard=True, devices_per_node=2),
}


def _parity_worker(rank, world_size, port, out_dir, config_names):
    _init(rank, world_size, port)
    results = {}
    try:
        for name in config_names:
            cfg = dict(PARITY_CONFIGS[name])
            torch.manual_seed(0)
            backbone, head = _tiny_vit(), _head()
            ref_backbone, ref_head = copy.deepcopy(backbone), copy.deepcopy(head)
            mesh = build_mesh(hybrid_shard=cfg.pop("hybrid_shard"), devices_per_node=cfg.pop("devices_per_node", None))
            parallelize(backbone, mesh=mesh, **cfg)
            parallelize(head, mesh=mesh)
            sharded = all(type(p).__name__ == "DTensor" for p in [*backbone.parameters(), *head.parameters()])

            crops = _crops(torch.Generator().manual_seed(7), 4)  # same global batch on every rank
            per_rank = len(crops[0]) // world_size
            local = [c[rank * per_rank : (rank + 1) * per_rank] for c in crops]

            loss = _loss(backbone, head, local)
            loss.backward()
            loss_mean = D.all_reduce_sum_(loss.detach().clone()) / world_size
            ref_loss = _loss(ref_backbone, ref_head, crops)
            ref_loss.backward()

            grads = {**_named_grads(backbone), **{f"head.{k}": v for k, v in _named_grads(head).items()}}
            ref_grads = {**_named_grads(ref_backbone), **{f"head.{k}": v for k, v in _named_grads(ref_head).items()}}

            # Methods other than forward are registered with FSDP, so they gather parameters too.
            x = crops[0][:2]
            with torch.no_grad():
                inter = backbone.get_intermediate_layers(x, n=2)
                ref_inter = ref_backbone.get_intermediate_layers(x, n=2)
                feat = backbone.forward_features(x)["x_norm_clstoken"]
                ref_feat = ref_backbone.forward_features(x)["x_norm_clstoken"]
            results[name] = {
                "loss_diff": abs(loss_mean.item() - ref_loss.item()),
                "grad_diff": _max_diff(grads, ref_grads),
                "grad_scale": max(v.abs().max().item() for v in ref_grads.values()),
                "sharded": sharded,
                "mesh_shape": list(mesh.shape),
                "inter_diff": max((a - b).abs().max().item() for a, b in zip(inter, ref_inter)),
                "feat_diff": (feat - ref_feat).abs().max().item(),
            }
    finally:
        D.destroy_distributed()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "config_names",
    [
        pytest.param(("full_shard", "hybrid_2x1", "hybrid_1x2", "full_shard_selective_ac"), id="meshes"),
        # dynamo tracing in two processes on a shared CPU takes ~10-25 s
        pytest.param(("full_shard_ac_compile_keep_gathered",), id="checkpointing_and_compile", marks=pytest.mark.slow),
    ],
)
def test_fsdp_forward_backward_matches_unsharded(tmp_path, config_names):
    results = _spawn(_parity_worker, tmp_path, 2, config_names)
    for rank, per_config in enumerate(results):
        assert list(per_config) == list(config_names)
        for name, r in per_config.items():
            assert r["sharded"], name
            assert r["loss_diff"] < 1e-6, (rank, name, r)
            assert r["grad_scale"] > 1e-3, (rank, name, r)  # the comparison is not vacuous
            # fp32 round-off only (two half-batch sums vs one full-batch sum); a wrong averaging
            # or a missing gradient would be off by the order of grad_scale
            assert r["grad_diff"] < 5e-6 * r["grad_scale"], (rank, name, r)
            assert r["inter_diff"] < 1e-5 and r["feat_diff"] < 1e-5, (rank, name, r)
    expected_shapes = {"full_shard": [2], "hybrid_2x1": [2, 1], "hybrid_1x2": [1, 2]}
    for name in config_names:
        if name in expected_shapes:
            assert results[0][name]["mesh_shape"] == expected_shapes[name]


def _ema_worker(rank, world_size, port, out_dir):
    _init(rank, world_size, port)
    result = {}
    try:
        torch.manual_seed(0)
        student = nn.ModuleDict({"backbone": _tiny_vit(), "head": _head()})
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(torch.randn_like(p))  # teacher differs from the student
        ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)

        mesh = build_mesh(hybrid_shard=False)
        parallelize_student_teacher(student, teacher, mesh=mesh, activation_checkpointing=True)
        result["teacher_frozen"] = not any(p.requires_grad for p in teacher.parameters())

        # Pair by name without the checkpoint prefix (only the student is checkpointed).
        s_params = {strip_wrapper_prefixes(n): p for n, p in student.named_parameters()}
        t_params = {strip_wrapper_prefixes(n): p for n, p in teacher.named_parameters()}
        assert s_params.keys() == t_params.keys()
        keys = sorted(t_params)
        result["same_sharding"] = all(
            t_params[k].placements == s_params[k].placements
            and t_params[k].to_local().shape == s_params[k].to_local().shape
            for k in keys
        )
        result["is_sharded"] = any(t_params[k].to_local().numel() < t_params[k].numel() for k in keys)

        m = 0.9
        with torch.no_grad():
            t_local = [t_params[k].to_local() for k in keys]
            s_local = [s_params[k].to_local() for k in keys]
            torch._foreach_mul_(t_local, m)
            torch._foreach_add_(t_local, s_local, alpha=1 - m)

            ref_s = dict(ref_student.named_parameters())
            ref_t = dict(ref_teacher.named_parameters())
            ref_changed = 0.0
            diff = 0.0
            for k in keys:
                expected = m * ref_t[k] + (1 - m) * ref_s[k]
                ref_changed = max(ref_changed, (expected - ref_t[k]).abs().max().item())
                diff = max(diff, (t_params[k].full_tensor() - expected).abs().max().item())
        result["ema_diff"] = diff
        result["ema_change"] = ref_changed

        # The trainer's EMA (dinoscale.train.teacher) pairs the AC-wrapped student with the plain
        # teacher by name and updates the local shards the same way.
        ema_update_(teacher, student, m)
        with torch.no_grad():
            diff = 0.0
            for k in keys:
                expected = m * (m * ref_t[k] + (1 - m) * ref_s[k]) + (1 - m) * ref_s[k]
                diff = max(diff, (t_params[k].full_tensor() - expected).abs().max().item())
        result["trainer_ema_diff"] = diff
    finally:
        D.destroy_distributed()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.mark.distributed
def test_ema_on_local_shards_matches_unsharded_ema(tmp_path):
    for r in _spawn(_ema_worker, tmp_path):
        assert r["teacher_frozen"] and r["same_sharding"] and r["is_sharded"]
        assert r["ema_change"] > 1e-2  # the update did something
        assert r["ema_diff"] < 1e-6, r
        assert r["trainer_ema_diff"] < 1e-6, r


def _cpu_supports_bf16():
    try:
        a = torch.randn(4, 4, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except RuntimeError:
        return False


def _mixed_precision_worker(rank, world_size, port, out_dir):
    _init(rank, world_size, port)
    result = {}
    try:
        torch.manual_seed(0)
        backbone = _tiny_vit()
        seen = []

        def record(module, inputs, output):
            seen.append((str(module.weight.dtype), str(inputs[0].dtype), str(output.dtype)))

        for block in backbone.blocks:
            block.attn.qkv.register_forward_hook(record)
        parallelize(
            backbone,
            mesh=build_mesh(hybrid_shard=False),
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32,
            activation_checkpointing=True,
        )
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3)
        crops = _crops(torch.Generator().manual_seed(3 + rank), 2)
        outs = backbone(crops, is_training=True)
        loss = sum(o["x_norm_clstoken"].float().pow(2).mean() for o in outs)
        loss.backward()
        result["grad_dtypes"] = sorted({str(p.grad.dtype) for p in backbone.parameters() if p.grad is not None})
        before = {n: p.full_tensor().clone() for n, p in backbone.named_parameters()}
        optimizer.step()
        result["changed"] = any(
            not torch.equal(before[n], p.full_tensor()) for n, p in backbone.named_parameters()
        )
        result["seen"] = sorted(set(seen))
        result["n_seen"] = len(seen)
        result["param_dtypes"] = sorted({str(p.dtype) for g in optimizer.param_groups for p in g["params"]})
        result["state_dtypes"] = sorted(
            {str(v.dtype) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim}
        )
        result["output_dtype"] = str(outs[0]["x_norm_clstoken"].dtype)
    finally:
        D.destroy_distributed()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.mark.distributed
@pytest.mark.skipif(not _cpu_supports_bf16(), reason="this CPU build cannot compute in bfloat16")
def test_mixed_precision_policy_is_honoured(tmp_path):
    for r in _spawn(_mixed_precision_worker, tmp_path):
        # inside forward (and its checkpoint recomputation) the block computes in bf16 ...
        assert r["seen"] == [["torch.bfloat16", "torch.bfloat16", "torch.bfloat16"]], r
        assert r["n_seen"] >= 2 * 2  # 2 blocks, forward + recomputation in backward
        assert r["output_dtype"] == "torch.bfloat16"
        # ... while the optimizer sees fp32 parameters, gradients and states
        assert r["param_dtypes"] == ["torch.float32"]
        assert r["grad_dtypes"] == ["torch.float32"]
        assert r["state_dtypes"] == ["torch.float32"]
        assert r["changed"]


def _world_size_one_worker(rank, world_size, port, out_dir):
    _init(rank, world_size, port)
    result = {}
    try:
        torch.manual_seed(0)
        model = _tiny_vit()
        ref = copy.deepcopy(model)
        mesh = build_mesh(hybrid_shard=False)
        parallelize(model, mesh=mesh, activation_checkpointing=True)
        x = torch.randn(2, 3, IMG, IMG)
        model(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        # The features too: FSDP2 hooks every output of the root, and warns when one is a view (an in-place op on
        # it would drop the hook); the backbone's token outputs must not be views of one another.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for net in (model, ref):
                out = net(x, is_training=True)
                (out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].pow(2).sum()).backward()
                small = x[:, :, : IMG // 2, : IMG // 2]
                outs = net.forward_features([x, small])  # the multi-crop entry point, a forward method of FSDP's
                sum(o["x_norm_patchtokens"].mean() + o["x_prenorm"].pow(2).mean() for o in outs).backward()
        result["view_warnings"] = [str(w.message) for w in caught if "view tensor" in str(w.message)]
        result["mesh_shape"] = list(mesh.shape)
        result["dtensor"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
        result["grad_diff"] = _max_diff(_named_grads(model), _named_grads(ref))
        try:
            parallelize(model, mesh=mesh)
        except ValueError as e:
            result["second_call"] = str(e)
    finally:
        D.destroy_distributed()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


@pytest.mark.distributed
def test_world_size_one_mesh(tmp_path):
    (r,) = _spawn(_world_size_one_worker, tmp_path, 1)
    assert r["mesh_shape"] == [1] and r["dtensor"]
    assert r["grad_diff"] < 1e-6
    assert r["view_warnings"] == []
    assert "already sharded" in r.get("second_call", "")


# ----------------------------------------------------------------------------- memory model


def _memory_estimate_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_estimate.py"
    spec = importlib.util.spec_from_file_location("memory_estimate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_estimate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglufused"])
def test_activation_estimate_matches_measurement(ffn_layer):
    """The per-block activation model of benchmarks/memory_estimate.py (docs/scaling.md) against
    what autograd actually saves and what the process holds, on a small fp32 model."""
    me = _memory_estimate_module()
    plain = me.measure(dim=96, depth=2, heads=2, batch=2, ffn_layer=ffn_layer, ac=False)
    # the bytes autograd saves (counted exactly) are within 5% of the formula
    assert abs(plain["saved_for_backward"] - plain["estimate_held"]) < 0.05 * plain["estimate_held"], plain
    # RSS is noisier (allocator granularity, output tensors)
    assert abs(plain["held_after_forward"] - plain["estimate_held"]) < 0.25 * plain["estimate_held"], plain
    checkpointed = me.measure(dim=96, depth=2, heads=2, batch=2, ffn_layer=ffn_layer, ac=True)
    # checkpointing keeps only block inputs: a small fraction of the plain model's activations
    assert checkpointed["held_after_forward"] < 0.3 * plain["held_after_forward"], (checkpointed, plain)


def test_memory_table_has_every_model_and_sharding():
    me = _memory_estimate_module()
    text = me.table(80.0)
    for recipe in me.RECIPES:
        assert text.count(f"| {recipe.name} |") == 2 * len(me.SHARDINGS)
    g = next(r for r in me.RECIPES if r.name == "ViT-g/14")
    full = me.estimate(g, shards=64, activation_checkpointing=False)
    none = me.estimate(g, shards=1, activation_checkpointing=False)
    # sharding divides the 20 bytes/param of fp32 states by the number of GPUs
    assert abs(none["states"] / full["states"] - 64) < 1e-9
    assert full["params"] > 1.1e9  # ViT-g/14 backbone (1.13 B) + two 131072-prototype heads
