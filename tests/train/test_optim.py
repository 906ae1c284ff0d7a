import pytest
import torch
from torch import nn

from dinoscale.models.heads import DINOHead
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.parallel import strip_wrapper_prefixes
from dinoscale.train.optim import (
    apply_schedule_,
    build_optimizer,
    clip_grad_norm_,
    get_param_groups,
)

DIM = 8


def student(depth=2):
    """The parts of a DINO student: a tiny ViT (2 registers, LayerScale) and a DINO head; the optimizer's
    groups come from their ``no_weight_decay()`` and the backbone's ``layer_id()``."""
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(
        img_size=8, patch_size=4, embed_dim=DIM, depth=depth, num_heads=2, init_values=1e-5, num_register_tokens=2
    )
    head = DINOHead(DIM, 16, nlayers=2, hidden_dim=DIM, bottleneck_dim=DIM)
    return nn.ModuleDict({"backbone": backbone, "dino_head": head})


def groups_by_name(model, groups):
    """name -> (lr_multiplier, wd_multiplier, is_last_layer, group name) for every grouped parameter."""
    by_id = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in by_id, "a parameter is in two groups"
            by_id[id(p)] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], g["name"])
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_layerwise_lr_decay_and_weight_decay_rules():
    model = student()
    groups = get_param_groups(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2, n_blocks=2)
    got = groups_by_name(model, groups)
    assert len(got) == len(list(model.parameters()))
    expected = {
        # layer id 0: 0.5 ** 3
        "backbone.cls_token": (0.125, 0.0, False),
        "backbone.pos_embed": (0.125, 0.0, False),
        "backbone.mask_token": (0.125, 0.0, False),
        "backbone.register_tokens": (0.125, 0.0, False),
        "backbone.patch_embed.proj.weight": (0.125 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.125 * 0.2, 0.0, False),
        # blocks.i -> layer id i + 1
        "backbone.blocks.0.attn.qkv.weight": (0.25, 1.0, False),
        "backbone.blocks.0.attn.qkv.bias": (0.25, 0.0, False),
        "backbone.blocks.0.norm1.weight": (0.25, 0.0, False),
        "backbone.blocks.0.ls1.gamma": (0.25, 0.0, False),
        "backbone.blocks.1.mlp.fc2.weight": (0.5, 1.0, False),
        "backbone.blocks.1.norm2.bias": (0.5, 0.0, False),
        "backbone.blocks.1.ls2.gamma": (0.5, 0.0, False),
        # after the blocks: full lr
        "backbone.norm.weight": (1.0, 0.0, False),
        "dino_head.mlp.0.weight": (1.0, 1.0, False),
        "dino_head.mlp.2.bias": (1.0, 0.0, False),
        "dino_head.last_layer.weight_v": (1.0, 1.0, True),
        "dino_head.last_layer.weight_g": (1.0, 0.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        assert got[name][0] == pytest.approx(lr_mult), name
        assert got[name][1:3] == (wd_mult, last), name
    # groups are keyed by (lr_mult, wd_mult, last): tokens (no wd), patch embed (own lr; wd / no wd),
    # 2 blocks and the top (wd / no wd each), and the last layer's two.
    keys = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}
    assert len(keys) == len(groups)
    assert len(groups) == 1 + 2 + 3 * 2 + 2
    assert all(set(g) == {"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "name"} for g in groups)
    assert len({g["name"] for g in groups}) == len(groups)


def test_no_decay_gives_few_groups_and_skips_frozen_params():
    model = student()
    model["backbone"].pos_embed.requires_grad_(False)
    groups = get_param_groups(model, n_blocks=2)
    assert len(groups) == 4  # (wd, no wd) x (last layer or not)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model["backbone"].pos_embed) not in grouped
    assert len(grouped) == len(list(model.parameters())) - 1


class CheckpointWrapper(nn.Module):
    def __init__(self, module):
        super().__init__()
        self._checkpoint_wrapped_module = module


class Compiled(nn.Module):
    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


def test_wrapper_fragments_are_ignored():
    plain = student()
    wrapped = student()
    wrapped["backbone"].blocks[0] = CheckpointWrapper(wrapped["backbone"].blocks[0])
    wrapped["backbone"].blocks[1] = Compiled(CheckpointWrapper(wrapped["backbone"].blocks[1]))
    wrapped["dino_head"] = Compiled(wrapped["dino_head"])
    outer = nn.Module()
    outer.module = wrapped  # DDP-style
    names = [n for n, _ in outer.named_parameters()]
    assert "module.backbone.blocks.1._orig_mod._checkpoint_wrapped_module.ls1.gamma" in names
    assert "module.dino_head._orig_mod.last_layer.weight_g" in names

    kwargs = dict(lr_decay_rate=0.7, patch_embed_lr_mult=0.2, n_blocks=2)
    want = groups_by_name(plain, get_param_groups(plain, **kwargs))
    got = groups_by_name(outer, get_param_groups(outer, **kwargs))
    assert {strip_wrapper_prefixes(n): v for n, v in got.items()} == want


class Declared(nn.Module):
    """A module that declares its own metadata: no decay on a matrix, a layer id per sub-layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.top = nn.Linear(DIM, DIM)

    def no_weight_decay(self):
        return {"embed.weight"}

    def layer_id(self, name):
        return 0 if name.startswith("embed.") else 1


def test_the_models_metadata_drives_the_groups():
    model = nn.ModuleDict({"declared": Declared(), "plain": nn.Linear(DIM, DIM), "proj": nn.Linear(DIM, DIM)})
    model["proj"] = Compiled(model["proj"])
    got = groups_by_name(model, get_param_groups(model, lr_decay_rate=0.5, n_blocks=1))
    assert {n: v[:3] for n, v in got.items()} == {
        # the module's own no_weight_decay() and layer_id(): the bias of "embed" is decayed, its weight is not
        "declared.embed.weight": (0.25, 0.0, False),
        "declared.embed.bias": (0.25, 1.0, False),
        "declared.top.weight": (0.5, 1.0, False),
        "declared.top.bias": (0.5, 1.0, False),
        # nothing declared: top layer, decayed unless 1-d
        "plain.weight": (1.0, 1.0, False),
        "plain.bias": (1.0, 0.0, False),
        "proj._orig_mod.weight": (1.0, 1.0, False),
        "proj._orig_mod.bias": (1.0, 0.0, False),
    }


def test_strip_wrapper_prefixes_removes_whole_components_only():
    assert strip_wrapper_prefixes("module.backbone._orig_mod.blocks.3._checkpoint_wrapped_module.attn.qkv.weight") == (
        "backbone.blocks.3.attn.qkv.weight"
    )
    assert strip_wrapper_prefixes("backbone.submodule.weight") == "backbone.submodule.weight"
    assert strip_wrapper_prefixes("my_module.x") == "my_module.x"
    assert strip_wrapper_prefixes("_fsdp_wrapped_module.blocks.0.x_checkpoint_wrapped_module.w") == (
        "blocks.0.x_checkpoint_wrapped_module.w"
    )


def test_model_deeper_than_n_blocks_is_an_error():
    with pytest.raises(ValueError, match=r"backbone.norm.weight' has layer id 3.*n_blocks=1"):
        get_param_groups(student(depth=2), lr_decay_rate=0.9, n_blocks=1)
    frozen = student()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        get_param_groups(frozen, n_blocks=2)


def test_apply_schedule_sets_lr_and_weight_decay_per_group():
    model = student()
    groups = get_param_groups(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2, n_blocks=2)
    opt = build_optimizer(groups)
    apply_schedule_(opt, lr=1e-3, wd=0.04, last_layer_lr=2e-3)
    for g in opt.param_groups:
        base = 2e-3 if g["is_last_layer"] else 1e-3
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["lr_x0.025_wd_x1"]["lr"] == pytest.approx(2.5e-5)
    assert by_name["lr_x1_wd_x0_last_layer"]["weight_decay"] == 0.0


def test_optimizer_step_leaves_frozen_last_layer_and_follows_schedule():
    model = student()
    opt = build_optimizer(get_param_groups(model, n_blocks=2))
    assert opt.defaults["fused"]  # CPU: torch's fused kernel (it can skip a step on the device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    apply_schedule_(opt, lr=1e-2, wd=0.0, last_layer_lr=0.0)  # frozen prototypes
    opt.step()
    for name, p in model.named_parameters():
        if "last_layer" in name:
            assert torch.equal(p, before[name]), name
        else:
            # first AdamW step moves every weight by lr * sign(grad) (up to eps)
            assert torch.allclose((before[name] - p).abs(), torch.full_like(p, 1e-2), rtol=1e-3), name


def test_weight_decay_multiplier_reaches_adamw():
    model = student()
    opt = build_optimizer(get_param_groups(model, n_blocks=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    apply_schedule_(opt, lr=0.1, wd=0.5, last_layer_lr=0.1)
    opt.step()
    # with zero gradients only decoupled weight decay acts: p <- p * (1 - lr * wd * wd_multiplier)
    w = model["dino_head"].mlp[0].weight
    assert torch.allclose(w, before["dino_head.mlp.0.weight"] * (1 - 0.1 * 0.5))
    b = model["backbone"].blocks[0].norm1.weight
    assert torch.equal(b, before["backbone.blocks.0.norm1.weight"])


def test_build_optimizer_does_not_modify_the_callers_groups_and_rejects_foreign_groups():
    groups = get_param_groups(student(), n_blocks=2)
    snapshot = [set(g) for g in groups]
    build_optimizer(groups, betas=(0.9, 0.95), eps=1e-6)
    assert [set(g) for g in groups] == snapshot
    with pytest.raises(ValueError, match="lr_multiplier"):
        build_optimizer([{"params": list(student().parameters())}])
    plain = torch.optim.AdamW(student().parameters())
    with pytest.raises(KeyError, match="get_param_groups"):
        apply_schedule_(plain, lr=1.0, wd=0.0, last_layer_lr=1.0)


def test_clip_grad_norm():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    unused = nn.Parameter(torch.zeros(3))  # no grad: ignored
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0])

    norm = clip_grad_norm_([a, b, unused], None)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    assert norm.item() == pytest.approx(5.0)
    assert a.grad.tolist() == [3.0, 0.0]  # not clipped
    norm = clip_grad_norm_([a, b, unused], 0)
    assert norm.item() == pytest.approx(5.0) and b.grad.item() == 4.0

    norm = clip_grad_norm_([a, b, unused], 1.0)
    assert norm.item() == pytest.approx(5.0)  # the norm before clipping
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5)
    assert b.grad.item() == pytest.approx(0.8, rel=1e-5)
    # below the threshold nothing changes
    clip_grad_norm_([a, b], 10.0)
    assert b.grad.item() == pytest.approx(0.8, rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_skips_without_touching_weights_moments_or_step_count(fused):
    from dinoscale.train.optim import step_unless_

    model = student()
    opt = build_optimizer(get_param_groups(model, n_blocks=2), fused=fused)
    apply_schedule_(opt, lr=1e-3, wd=0.04, last_layer_lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step_unless_(opt, torch.tensor(False))  # a normal step: moments and step counts exist now
    state = {k: {n: v.clone() for n, v in st.items()} for k, st in opt.state.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_unless_(opt, torch.tensor(True))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    for k, st in opt.state.items():
        assert all(torch.equal(v, state[k][n]) for n, v in st.items())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step_unless_(opt, torch.tensor(False))
    assert not all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_init_state_creates_adamws_first_state_and_changes_no_step(fused):
    from dinoscale.train.optim import init_state_

    models = [student(), student()]
    opts = [build_optimizer(get_param_groups(m, n_blocks=2), fused=fused) for m in models]
    init_state_(opts[1])
    weights = {n: p.detach().clone() for n, p in models[1].named_parameters()}
    assert all(torch.equal(p, weights[n]) for n, p in models[0].named_parameters())  # nothing moved
    assert len(opts[1].state) == sum(1 for _ in models[1].parameters())
    for st in opts[1].state.values():
        assert st["step"].item() == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    with pytest.raises(RuntimeError, match="fresh optimizer"):
        init_state_(opts[1])
    # AdamW from the created state takes exactly the steps of one that creates it itself
    for k in range(3):
        for model, opt in zip(models, opts):
            apply_schedule_(opt, lr=1e-3 * (k + 1), wd=0.04, last_layer_lr=1e-3)
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.1 * (i + 1) * (-1) ** k)
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(opts[0].state[a][key], opts[1].state[b][key]) for key in opts[0].state[a]), name


@pytest.mark.parametrize("fused", [True, False])
def test_set_trainable_freezes_what_the_optimizer_holds_and_adamw_skips_it(fused):
    from dinoscale.train.optim import init_state_, set_trainable_

    model = student()
    model["backbone"].mask_token.requires_grad_(False)  # not optimized: left alone
    opt = build_optimizer(get_param_groups(model, n_blocks=2), fused=fused)
    init_state_(opt)
    backbone = {n: p.detach().clone() for n, p in model["backbone"].named_parameters()}
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model["backbone"].parameters()
             if p in opt.state}
    set_trainable_(opt, model["backbone"], False)
    assert not any(p.requires_grad for p in model["backbone"].parameters())
    apply_schedule_(opt, lr=1e-2, wd=0.04, last_layer_lr=1e-2)
    x = torch.randn(2, 3, 8, 8)
    model["dino_head"](model["backbone"](x)).sum().backward()
    assert all(p.grad is None for p in model["backbone"].parameters())  # no backward through the backbone
    opt.step()
    assert all(torch.equal(p, backbone[n]) for n, p in model["backbone"].named_parameters())
    for p in model["backbone"].parameters():
        if p in opt.state:
            assert all(torch.equal(v, state[id(p)][k]) for k, v in opt.state[p].items())
    assert all(opt.state[p]["step"].item() == 1 for p in model["dino_head"].parameters())

    set_trainable_(opt, model["backbone"], True)
    assert not model["backbone"].mask_token.requires_grad
    opt.zero_grad(set_to_none=True)
    model["dino_head"](model["backbone"](x)).sum().backward()
    opt.step()
    assert not torch.equal(model["backbone"].blocks[0].attn.qkv.weight, backbone["blocks.0.attn.qkv.weight"])
    assert opt.state[model["backbone"].cls_token]["step"].item() == 1
