"""Distillation from a frozen teacher (``dinoscale.methods.distillation``): loading the teacher from a run, a hub
architecture with timm / Hugging Face weights or timm by name; both objectives; several students; the loop
around them (the teacher never changes, resume is exact, 2 ranks equal 1, a sharded teacher gives the same
targets). Tiny networks on the CPU; the ``runner`` tests read Fashion-MNIST."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dinoscale import checkpoint
from dinoscale.config import CONFIG_DIR, load_config, save_config
from dinoscale.distributed import find_free_port
from dinoscale.eval.backbones import load_backbone
from dinoscale.methods.base import frozen_networks
from dinoscale.methods.distillation import backbone_tokens, load_frozen_teacher, resize_patch_grid
from dinoscale.methods.registry import build_method
from dinoscale.train.build import build_networks, build_run, optimizer_from_config, schedules_from_config
from dinoscale.train.perf.flops import example_batch
from dinoscale.train.step import train_step

# A tiny ViT teacher of another width (24) than the students' (32), in the students' 16 px, 4 px-patch geometry.
TEACHER_ARGS = ["embed_dim=24", "depth=1", "num_heads=2", "patch_size=4", "img_size=16"]
# The recipe's student: no stochastic depth (DINOv2's distillation removes it; it would also draw per student).
NO_DROP_PATH = ["model.drop_path_rate=0.0"]


def teacher_overrides(run_dir, *extra):
    return [f"distillation.teacher={run_dir}", "distillation.projector_hidden_dim=16", *extra]


def tokens_close(a, b, atol=1e-5):
    assert a.shape == b.shape and (a - b).abs().max() <= atol, (a.shape, b.shape, (a - b).abs().max())


def randomize_(module, seed=0):
    """Weights far from the library inits (LayerScale ~1e-5 and zero biases would hide layout errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if p.ndim == 1 else 0.0))
    return module


# ------------------------------------------------------------------------------------------------ the teacher


def test_a_run_directory_brings_its_exported_backbone_and_heads(tiny_config, tiny_teacher_run):
    method = build_method(tiny_config("distillation", *teacher_overrides(tiny_teacher_run)))
    teacher = method.frozen_teacher
    assert method.objective == "heads" and set(teacher) == {"backbone", "dino_head"}
    exported = {"backbone": torch.load(tiny_teacher_run / "export" / "teacher_backbone.pth"),
                "heads": torch.load(tiny_teacher_run / "export" / "teacher_heads.pth")}
    loaded = {"backbone": teacher["backbone"].state_dict(),
              "heads": {f"dino_head.{k}": v for k, v in teacher["dino_head"].state_dict().items()}}
    for part in exported:
        assert exported[part].keys() == loaded[part].keys()
        assert all(torch.equal(exported[part][k], loaded[part][k]) for k in exported[part]), part
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # The teacher is no part of the method: not its parameters, not its (checkpointed) state.
    assert list(method.parameters()) == []
    assert set(method.state_dict()) == {"dino_loss.center", "ibot_loss.center"}
    assert frozen_networks(method) == {"teacher": teacher}


def test_a_run_without_export_gives_its_newest_checkpoints_ema_teacher(tmp_path, tiny_config):
    cfg = tiny_config("dinov2", f"train.output_dir={tmp_path}")
    save_config(cfg, tmp_path / "config.yaml")
    method, student, ema = build_networks(cfg, torch.device("cpu"))
    randomize_(ema)  # differs from the student: the teacher must come from the EMA
    checkpoint.save_checkpoint(tmp_path, 7, student=student, teacher=ema, optimizer=optimizer_from_config(cfg, student),
                               method=method, trainer_state={})
    teacher = build_method(tiny_config("distillation", f"distillation.teacher={tmp_path}")).frozen_teacher
    for key in ("backbone", "dino_head"):
        expected, got = ema[key].state_dict(), teacher[key].state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), key


def test_configuration_errors_name_the_fix(tiny_config, tiny_teacher_run):
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method(tiny_config("distillation"))
    with pytest.raises(ValueError, match=r"dino.head_n_prototypes=32, but the teacher's DINO head has 64"):
        build_method(tiny_config("distillation", *teacher_overrides(tiny_teacher_run), "dino.head_n_prototypes=32"))
    with pytest.raises(ValueError, match="teacher's patch size is 4"):
        build_method(tiny_config("distillation", *teacher_overrides(tiny_teacher_run), "model.patch_size=8"))
    headless = ["distillation.teacher=vit_small", f"distillation.teacher_model_args=[{','.join(TEACHER_ARGS)}]"]
    assert build_method(tiny_config("distillation", *headless)).objective == "features"  # auto
    with pytest.raises(ValueError, match="use distillation.objective=features"):
        build_method(tiny_config("distillation", *headless, "distillation.objective=heads"))
    with pytest.raises(ValueError, match=r"sets \['dept'\], which are not model: keys"):
        build_method(tiny_config("distillation", *teacher_overrides(tiny_teacher_run), "distillation.students=[{dept: 1}]"))


def test_hf_and_timm_layouts_and_timm_by_name_give_their_librarys_tokens(tmp_path, tiny_config):
    import timm
    import transformers

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    timm_ref = randomize_(timm.create_model("vit_small_patch14_dinov2", img_size=16, patch_size=4, embed_dim=24,
                                            depth=1, num_heads=2, num_classes=0)).eval()
    torch.save(timm_ref.state_dict(), tmp_path / "timm.pth")
    hf_ref = randomize_(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4))).eval()
    hf_ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with torch.no_grad():
        timm_tokens = timm_ref.forward_features(x)
        hf_tokens = hf_ref(pixel_values=x).last_hidden_state
    ours = [f"distillation.teacher_model_args=[{','.join(TEACHER_ARGS)},init_values=1.0]"]
    cases = {
        "timm layout": (["distillation.teacher=vit_small", f"distillation.teacher_weights={tmp_path / 'timm.pth'}",
                         *ours], timm_tokens),
        "HF layout": (["distillation.teacher=vit_small", f"distillation.teacher_weights={tmp_path / 'hf'}", *ours],
                      hf_tokens),
        "timm by name": (["distillation.teacher=timm:vit_small_patch14_dinov2",
                          f"distillation.teacher_weights={tmp_path / 'timm.pth'}",
                          "distillation.teacher_model_args=[img_size=16,patch_size=4,embed_dim=24,depth=1,num_heads=2]"],
                         timm_tokens),
    }
    for name, (overrides, reference) in cases.items():
        teacher = load_frozen_teacher(tiny_config("distillation", *overrides).distillation)
        with torch.no_grad():
            cls, patches, grid = backbone_tokens(teacher["backbone"], x)
        tokens_close(cls, reference[:, 0])
        tokens_close(patches, reference[:, 1:])
        assert grid == (4, 4), name


def test_a_dinov3_teacher_from_its_hugging_face_folder_gives_its_tokens(tmp_path, tiny_config):
    """A released DINOv3 backbone by its hub name, the weights a DINOv3ViTModel folder (the Hub's layout)."""
    import transformers

    hf_ref = randomize_(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_register_tokens=4, image_size=16,
        patch_size=4, intermediate_size=96, layerscale_value=1e-5))).eval()
    hf_ref.save_pretrained(tmp_path / "hf")
    x = torch.randn(3, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf_ref(pixel_values=x).last_hidden_state
    teacher = load_frozen_teacher(tiny_config(
        "distillation", "distillation.teacher=dinov3_vits16", f"distillation.teacher_weights={tmp_path / 'hf'}",
        f"distillation.teacher_model_args=[{','.join(TEACHER_ARGS)}]").distillation)
    with torch.no_grad():
        cls, patches, grid = backbone_tokens(teacher["backbone"], x)
    tokens_close(cls, reference[:, 0])
    tokens_close(patches, reference[:, 5:])  # after the 4 storage tokens
    assert grid == (4, 5)


def test_patch_grids_of_another_size_are_resampled():
    tokens = torch.randn(2, 16, 5)
    assert resize_patch_grid(tokens, (4, 4), (4, 4)) is tokens
    constant = torch.randn(2, 1, 5).expand(2, 16, 5)
    tokens_close(resize_patch_grid(constant, (4, 4), (2, 3)), constant[:, :6])
    # Row-major tokens: a map that grows down the rows and is constant along them stays so, on any grid.
    rows = torch.arange(4.0).repeat_interleave(4)[None, :, None].expand(1, 16, 3)  # token i on row i // 4
    for size in ((2, 2), (8, 6)):
        grid = resize_patch_grid(rows, (4, 4), size)[0, :, 0].reshape(size)
        assert torch.equal(grid, grid[:, :1].expand(size)) and (grid[1:, 0] > grid[:-1, 0]).all(), size


def test_the_fmnist_config_distils_from_a_long_recipe_shaped_teacher(tmp_path):
    """configs/methods/distillation_fmnist.yaml against a teacher of the long recipe's shape (random weights)."""
    from dinoscale.methods.dinov2 import DINOv2
    from dinoscale.train.evaluate import export_network

    teacher_cfg = load_config("quickstart", ["crops.local_crops_size=21", f"train.output_dir={tmp_path}"])
    save_config(teacher_cfg, tmp_path / "config.yaml")
    export_network(DINOv2(teacher_cfg).build_networks()[1], tmp_path / "export", "teacher")
    cfg = load_config(CONFIG_DIR / "methods" / "distillation_fmnist.yaml",
                      [f"distillation.teacher={tmp_path}", "train.autocast=none", "train.device=cpu"])
    method, student, ema = build_networks(cfg, torch.device("cpu"))
    assert method.objective == "heads" and (student["backbone"].embed_dim, student["backbone"].n_blocks) == (96, 2)
    batch = example_batch(method, cfg.model.patch_size, 4, image_size=28)
    loss, terms = method(student, ema, batch, {"teacher_temp": 0.04})
    assert torch.isfinite(loss) and set(terms) == {"dino_global", "dino_local", "koleo", "ibot"}


@pytest.mark.parametrize("size,arch", [("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large")])
def test_the_vitg14_distillation_recipes(size, arch):
    """DINOv2's distilled models: a frozen ViT-g/14 run of configs/train/vitg14.yaml teaches each size."""
    cfg = load_config(f"train/distill_vitg14_to_vit{size}14")
    teacher = load_config("train/vitg14")
    assert (cfg.method, cfg.model.arch, cfg.model.patch_size, cfg.model.drop_path_rate) == ("distillation", arch, 14, 0)
    for section in ("dino", "ibot"):  # the teacher's heads are the targets: same prototypes, same centering
        assert cfg[section].head_n_prototypes == teacher[section].head_n_prototypes
        assert cfg[section].centering == teacher[section].centering
    assert cfg.ibot.separate_head and not cfg.distillation.mask_student
    assert cfg.optim.epochs * cfg.train.official_epoch_length == 625_000
    assert cfg.optim.warmup_epochs * cfg.train.official_epoch_length == 100_000
    # lr 1e-3 at the recipe's global batch of 2048 under the sqrt scaling rule
    assert cfg.optim.base_lr * (2048 / 1024) ** 0.5 == pytest.approx(1e-3, rel=1e-3)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.teacher.momentum_teacher) == (0.04, 0.2, 0.994)


# ------------------------------------------------------------------------------------------------ the students


@pytest.mark.parametrize("objective", ["heads", "features"])
def test_the_teacher_never_changes_and_is_never_trained(tiny_config, tiny_teacher_run, objective):
    cfg = tiny_config("distillation", *teacher_overrides(tiny_teacher_run), f"distillation.objective={objective}",
                      "train.device=cpu")
    method, student, ema = build_networks(cfg, torch.device("cpu"))
    teacher = method.frozen_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = optimizer_from_config(cfg, student)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    batch = example_batch(method, cfg.model.patch_size, 4, image_size=32)
    sched = schedules_from_config(cfg, global_batch=4).at(4)
    for _ in range(3):
        out = train_step(method, student, ema, optimizer, batch, sched, torch.tensor(0.0), clip_grad=3.0)
        assert not out.skipped
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert not all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())


def test_students_start_where_they_would_start_alone(tiny_config, tiny_teacher_run):
    """The teacher draws nothing from the students' seed; a further student starts as it would on its own."""
    cpu = torch.device("cpu")
    second = ["embed_dim=16", "depth=1"]
    _, multi, _ = build_networks(tiny_config(
        "distillation", *teacher_overrides(tiny_teacher_run),
        f"distillation.students=[{{name: second, {', '.join(s.replace('=', ': ') for s in second)}}}]"), cpu)
    _, from_scratch, _ = build_networks(tiny_config("dinov2"), cpu)
    _, alone, _ = build_networks(tiny_config("distillation", *teacher_overrides(tiny_teacher_run),
                                             *(f"model.{s}" for s in second)), cpu)
    for a, b in ((multi["backbone"], from_scratch["backbone"]),
                 (multi["students"]["second"], alone)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("objective", ["heads", "features"])
def test_distillation_lowers_the_loss_to_the_fixed_teacher(runner, tiny_teacher_run, objective):
    runner.assert_training_lowers_loss("distillation", *teacher_overrides(tiny_teacher_run),
                                       f"distillation.objective={objective}", *runner.FIXED_TEACHER)


def test_timm_and_hf_teachers_train_end_to_end(runner, tmp_path):
    """Head-free distillation through the loop from a timm model by name and from Hugging Face weights."""
    import transformers

    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                                       image_size=16, patch_size=4)).save_pretrained(tmp_path / "hf")
    teachers = {
        "timm": ["distillation.teacher=timm:vit_small_patch14_dinov2",  # random weights: nothing to download
                 "distillation.teacher_model_args=[img_size=16,patch_size=4,embed_dim=24,depth=1,num_heads=2]"],
        "hf": ["distillation.teacher=vit_small", f"distillation.teacher_weights={tmp_path / 'hf'}",
               f"distillation.teacher_model_args=[{','.join(TEACHER_ARGS)},init_values=1.0]"],
    }
    for name, overrides in teachers.items():
        runner.tmp_path = tmp_path / name
        trained, _ = runner.assert_training_lowers_loss("distillation", "distillation.projector_hidden_dim=16",
                                                        *overrides, steps=10)
        assert {"loss/feat_cls", "loss/feat_patch", "loss/feat_local"} <= set(trained[0])
        exported_student = load_backbone(weights=str(tmp_path / name / "trained"))  # the EMA student, as evaluated
        assert exported_student.embed_dim == 32


def rows_by_step(out_dir):
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if "type" not in r}


def exported(out_dir, name):
    return torch.load(Path(out_dir) / "export" / f"{name}.pth")


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_several_students_train_as_each_would_alone(runner, tiny_teacher_run, tmp_path):
    """One teacher forward shared by two students: each one's losses and weights are those of its own run."""
    base = [*teacher_overrides(tiny_teacher_run), *NO_DROP_PATH, "train.max_steps=3", "train.checkpoint_every=1000"]
    runner.train("distillation", *base, "distillation.students=[{name: second, embed_dim: 16, depth: 1}]",
                 out=tmp_path / "both")
    runner.train("distillation", *base, out=tmp_path / "first")
    runner.train("distillation", *base, "model.embed_dim=16", "model.depth=1", out=tmp_path / "second")
    both, first, second = (rows_by_step(tmp_path / n) for n in ("both", "first", "second"))
    terms = ("dino_global", "dino_local", "koleo", "ibot")
    for step in (1, 2, 3):
        assert [both[step][f"loss/{t}"] for t in terms] == [first[step][f"loss/{t}"] for t in terms]
        assert [both[step][f"loss/second/{t}"] for t in terms] == [second[step][f"loss/{t}"] for t in terms]
    assert_same_weights(exported(tmp_path / "both", "teacher_backbone"), exported(tmp_path / "first", "teacher_backbone"))
    assert_same_weights(exported(tmp_path / "both", "teacher_second_backbone"),
                        exported(tmp_path / "second", "teacher_backbone"))
    assert_same_weights(exported(tmp_path / "both", "teacher_second_heads"),
                        exported(tmp_path / "second", "teacher_heads"))


@pytest.mark.parametrize("objective", ["heads", "features"])
def test_resume_is_exact(runner, tiny_teacher_run, tmp_path, objective):
    overrides = [*teacher_overrides(tiny_teacher_run), f"distillation.objective={objective}",
                 "distillation.students=[{name: second, embed_dim: 16, depth: 1}]", "train.checkpoint_every=2"]
    runner.train("distillation", *overrides, "train.max_steps=4", out=tmp_path / "full")
    runner.train("distillation", *overrides, "train.max_steps=2", out=tmp_path / "stopped")
    _, result = runner.train("distillation", *overrides, "train.max_steps=4", out=tmp_path / "stopped")
    assert result.step == 4
    full, resumed = rows_by_step(tmp_path / "full"), rows_by_step(tmp_path / "stopped")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        losses = {k: v for k, v in full[step].items() if k.startswith("loss")}
        assert losses == {k: v for k, v in resumed[step].items() if k.startswith("loss")}
    for name in ("teacher_backbone", "teacher_heads", "teacher_second_backbone", "teacher_second_heads"):
        assert_same_weights(exported(tmp_path / "full", name), exported(tmp_path / "stopped", name))


# ------------------------------------------------------------------------------------------------ several ranks

# The distributed comparisons' config: no per-rank randomness (drop path) and full precision (FSDP's default
# param_dtype is bf16), LayerScale off so that the [CLS] features of different images differ from the start.
DIST = ["model.layerscale=null", "train.autocast=none", "compute.param_dtype=fp32", *NO_DROP_PATH]
GLOBAL_BATCH = 8


def spawn(worker, config_path, world_size=2):
    """Run ``worker(rank, config_path)`` in ``world_size`` gloo processes (torchrun's variables set)."""
    mp.start_processes(_in_group, args=(world_size, find_free_port(), worker, str(config_path)), nprocs=world_size,
                       join=True, start_method="spawn")


def _in_group(rank, world_size, port, worker, config_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dinoscale import distributed

    distributed.init_distributed()
    try:
        worker(rank, load_config(config_path))
    finally:
        distributed.destroy_distributed()


def _train(rank, cfg):
    from dinoscale.train.loop import train

    assert train(cfg).status == "finished"


@pytest.mark.distributed
@pytest.mark.parametrize("objective", ["heads", "features"])
def test_two_ranks_distill_like_one(runner, tiny_teacher_run, tmp_path, objective):
    """FSDP over 2 gloo ranks (the students, their EMA and the teacher sharded) ends where one process does.

    Both runs draw the timm teacher's random weights from the same seed (the teacher is built in a forked RNG)."""
    # The features objective learns from a timm model here: its blocks (an nn.Sequential) are sharded one by one.
    teacher = teacher_overrides(tiny_teacher_run) if objective == "heads" else [
        "distillation.teacher=timm:vit_small_patch14_dinov2", "distillation.projector_hidden_dim=16",
        "distillation.teacher_model_args=[img_size=16,patch_size=4,embed_dim=24,depth=2,num_heads=2]"]
    overrides = [*DIST, *teacher, f"distillation.objective={objective}",
                 "distillation.students=[{name: second, embed_dim: 16, depth: 1}]", "train.max_steps=3"]
    runner.train("distillation", *overrides, f"train.batch_size_per_rank={GLOBAL_BATCH}", out=tmp_path / "one")
    save_config(runner.config("distillation", *overrides, f"train.batch_size_per_rank={GLOBAL_BATCH // 2}",
                              out=tmp_path / "two"), tmp_path / "two.yaml")
    spawn(_train, tmp_path / "two.yaml")
    one, two = rows_by_step(tmp_path / "one"), rows_by_step(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        keys = [k for k in one[step] if k.startswith("loss") or k == "grad_norm"]
        assert len(keys) > 6 and keys == [k for k in two[step] if k.startswith("loss") or k == "grad_norm"]
        for key in keys:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    for name in ("teacher_backbone", "teacher_second_backbone"):
        a, b = exported(tmp_path / "one", name), exported(tmp_path / "two", name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _compare_sharded_teacher(rank, cfg):
    from torch.distributed.tensor import DTensor

    from dinoscale.methods.dinov2 import head_logits
    from dinoscale.parallel import build_mesh, parallelize_frozen

    method = build_method(cfg)
    teacher = method.frozen_teacher
    batch = example_batch(method, cfg.model.patch_size, 4, image_size=32, seed=rank)  # each rank its own images

    def outputs():
        with torch.no_grad():
            cls, patches, _ = backbone_tokens(teacher["backbone"], batch["global_crops"])
            method.dino_loss.center.zero_(), method.ibot_loss.center.zero_()
            return (cls, patches, *head_logits(teacher, cls, patches.flatten(0, 1)),
                    *method._head_targets(batch, teacher_temp=0.07))

    unsharded = outputs()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    parallelize_frozen(teacher, mesh=build_mesh(hybrid_shard=False))
    assert all(isinstance(p, DTensor) for p in teacher.parameters())  # sharded over the 2 ranks
    sharded = outputs()
    for a, b in zip(unsharded, sharded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same computation on the gathered weights
    after = checkpoint.full_state_dict(teacher)  # collective
    if rank == 0:
        assert all(torch.equal(before[k], after[k]) for k in before)

    # What the loop builds: the teacher sharded, stored in the compute dtype (FSDP's bf16 here), in no optimizer.
    cfg.compute.param_dtype = "bf16"
    run = build_run(cfg)
    teacher = run.method.frozen_teacher
    assert all(isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in teacher.parameters())
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    loss, _ = run.method(run.student, run.teacher, batch, {"teacher_temp": 0.07})
    assert torch.isfinite(loss)


@pytest.mark.distributed
def test_a_sharded_teacher_gives_the_targets_of_an_unsharded_one(tiny_config, tiny_teacher_run, tmp_path):
    cfg = tiny_config("distillation", *DIST, *teacher_overrides(tiny_teacher_run), "ibot.mask_sample_probability=1.0",
                      f"train.output_dir={tmp_path / 'run'}")
    save_config(cfg, tmp_path / "config.yaml")
    spawn(_compare_sharded_teacher, tmp_path / "config.yaml")
