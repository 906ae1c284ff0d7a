"""Continuing from pretrained weights (``dinoscale.train.continue_from`` and the ``continued:`` section), end to
end on a tiny ViT and real Fashion-MNIST images: the heads' k-means init, the heads-only warm-up (backbone bitwise
frozen, its AdamW state untouched, the teacher's backbone equal to it), exact resume inside and after the warm-up,
the same run on two ranks (FSDP2), and the errors raised before training."""

from pathlib import Path

import pytest
import torch

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.hub import WeightsLoadError
from dinoscale.models.factory import build_backbone
from dinoscale.train import loop
from dinoscale.train.build import build_networks, optimizer_from_config, schedules_from_config
from dinoscale.train.continue_from import PretrainedArchitectureError, load_pretrained_backbone
from dinoscale.train.perf.flops import example_batch
from dinoscale.train.step import train_step
from tests.test_train_distributed import BASE, assert_same_losses, launch, losses, teacher_weights
from tests.train.test_loop import TINY, assert_same_run, rows

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

CONTINUE = ["continued.head_init=kmeans", "continued.head_init_batches=4", "continued.backbone_warmup_steps=3",
            "train.log_throughput=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Weights of TINY's backbone from another seed (so not the network the run would build), and the tensors."""
    torch.manual_seed(123)
    backbone = build_backbone(load_config("quickstart", TINY).model, drop_path_rate=0.0)
    path = tmp_path_factory.mktemp("pretrained") / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    return path, {k: v.clone() for k, v in backbone.state_dict().items()}


def run(out_dir, pretrained_path, *extra):
    cfg = load_config("quickstart", TINY + CONTINUE + [f"model.pretrained_weights={pretrained_path}",
                                                       f"train.output_dir={out_dir}", *extra])
    return cfg, loop.train(cfg)


def part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@needs_fmnist
def test_warmup_keeps_the_backbone_bitwise_frozen_then_it_moves(tmp_path, pretrained):
    path, weights = pretrained
    run(tmp_path, path, "train.max_steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=10")
    saved = {int(p.name.split("_")[1]): checkpoint.read_dcp_checkpoint(p)
             for p in checkpoint.list_checkpoints(tmp_path)}
    assert sorted(saved) == [1, 2, 3, 4, 5]
    names = list(weights)
    for step in (1, 2, 3):  # the warm-up
        student, teacher = saved[step]["student"], saved[step]["teacher"]
        for name in names:
            assert torch.equal(student[f"backbone.{name}"], weights[name]), (step, name)
            assert torch.equal(teacher[f"backbone.{name}"], weights[name]), (step, name)
        # the frozen backbone's AdamW state exists and is untouched; the heads' counts the steps
        state = saved[step]["optimizer"]["state"]
        assert state["backbone.cls_token"]["step"].item() == 0 and not state["backbone.cls_token"]["exp_avg"].any()
        assert state["dino_head.last_layer.weight_v"]["step"].item() == step
    # the heads train during the warm-up
    head_weights = [saved[step]["student"]["dino_head.mlp.0.weight"] for step in (1, 3)]
    assert not torch.equal(*head_weights)
    # after it, the backbone moves, and the teacher follows it by the EMA
    moved = [n for n in names if not torch.equal(saved[4]["student"][f"backbone.{n}"], weights[n])]
    assert "blocks.0.attn.qkv.weight" in moved
    assert saved[4]["optimizer"]["state"]["backbone.cls_token"]["step"].item() == 1
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(saved[5]["teacher"][f"backbone.{qkv}"], weights[qkv])


@needs_fmnist
def test_teacher_starts_as_the_student_with_the_pretrained_backbone_and_kmeans_heads(tmp_path, pretrained):
    path, weights = pretrained
    cfg = load_config("quickstart", TINY + CONTINUE + [f"model.pretrained_weights={path}",
                                                       f"train.output_dir={tmp_path}"])
    method, student, teacher = build_networks(cfg, torch.device("cpu"))
    assert all(torch.equal(student["backbone"].state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())
    # The prototypes are unit k-means centres, not the random init the same seed gives.
    cfg_random = load_config("quickstart", TINY + [f"model.pretrained_weights={path}", f"train.output_dir={tmp_path}"])
    _, random_heads, _ = build_networks(cfg_random, torch.device("cpu"))
    prototypes = student["dino_head"].last_layer.weight.detach()
    assert not torch.allclose(prototypes, random_heads["dino_head"].last_layer.weight.detach())
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(64))
    assert torch.equal(student["dino_head"].mlp[0].weight, random_heads["dino_head"].mlp[0].weight)  # MLP as built
    # ... and they are deterministic given the seed
    _, again, _ = build_networks(cfg, torch.device("cpu"))
    assert torch.equal(again["dino_head"].last_layer.weight_v, student["dino_head"].last_layer.weight_v)


@needs_fmnist
@pytest.mark.parametrize("stop", [2, 3, 4])  # inside the warm-up, at its end, after it
def test_resume_across_the_warmup_is_exact(tmp_path, pretrained, stop):
    path, _ = pretrained
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full, path, "train.max_steps=6", "train.checkpoint_every=6")
    run(stopped, path, f"train.max_steps={stop}", f"train.checkpoint_every={stop}")
    _, result = run(stopped, path, "train.max_steps=6", "train.checkpoint_every=6")
    assert result.step == 6
    assert_same_run(full, stopped, 6)
    heads_a = torch.load(full / "export" / "teacher_heads.pth")
    heads_b = torch.load(stopped / "export" / "teacher_heads.pth")
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)


def test_train_step_with_a_frozen_backbone_updates_only_the_heads():
    cfg = load_config("quickstart", TINY + ["continued.backbone_warmup_steps=2", "train.device=cpu"])
    method, student, teacher = build_networks(cfg, torch.device("cpu"))
    optimizer = optimizer_from_config(cfg, student)
    batch = example_batch(method, cfg.model.patch_size, 4, image_size=32)
    sched = schedules_from_config(cfg, global_batch=4).at(5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = train_step(method, student, teacher, optimizer, batch, sched, torch.tensor(0.0), clip_grad=3.0,
                     backbone_frozen=True)
    assert torch.isfinite(out.loss) and not out.skipped
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["dino_head.mlp.0.weight"], before["dino_head.mlp.0.weight"])
    assert all(torch.equal(v, after[k]) for k, v in teacher.state_dict().items() if k.startswith("backbone."))
    train_step(method, student, teacher, optimizer, batch, sched, torch.tensor(0.0), clip_grad=3.0)
    assert not torch.equal(student.state_dict()["backbone.cls_token"], before["backbone.cls_token"])


def test_architecture_mismatch_names_both_architectures_and_the_settings(tmp_path):
    torch.manual_seed(0)
    small = build_backbone("vit_small", patch_size=14, img_size=224, num_register_tokens=4, init_values=1e-5)
    weights = tmp_path / "dinov2_vits14_reg4.pth"
    torch.save(small.state_dict(), weights)
    cfg = load_config("default", ["model.arch=vit_base", "model.patch_size=14", f"model.pretrained_weights={weights}"])
    with pytest.raises(PretrainedArchitectureError) as info:
        load_pretrained_backbone(build_backbone(cfg.model), cfg.model)
    message = str(info.value)
    assert message.startswith(f"model.pretrained_weights={weights} does not fit the configured model "
                              "(embed_dim, registers, ffn_hidden differ): the checkpoint has embed_dim 384, depth 12, "
                              "patch 14, 4 registers, mlp FFN of width 1536, with LayerScale; the config "
                              "(model.arch=vit_base) builds embed_dim 768, depth 12, patch 14, 0 registers, mlp FFN "
                              "of width 3072, with LayerScale. To continue from these weights set model.arch=vit_small "
                              "model.num_register_tokens=4\n"), message
    assert "shape mismatches" in message  # the hub's key-level listing follows


@needs_fmnist
def test_architecture_mismatch_stops_the_run_before_training(tmp_path, pretrained):
    path, _ = pretrained
    expected = (r"\(embed_dim, depth, ffn_hidden differ\): the checkpoint has embed_dim 32, depth 2, patch 4, 0 "
                r"registers, .* builds embed_dim 48, depth 3, .* set model.embed_dim=32 model.depth=2 \(and a "
                r"model.num_heads that divides 32\)\n")
    with pytest.raises(PretrainedArchitectureError, match=expected):
        run(tmp_path, path, "model.embed_dim=48", "model.depth=3")
    assert not (tmp_path / "metrics.jsonl").exists() and checkpoint.latest_checkpoint(tmp_path) is None


def test_weights_that_are_no_backbone_keep_the_hubs_message(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    cfg = load_config("quickstart", TINY + [f"model.pretrained_weights={path}"])
    with pytest.raises(WeightsLoadError, match=f"model.pretrained_weights={path}: cannot load"):
        load_pretrained_backbone(build_backbone(cfg.model), cfg.model)


@needs_fmnist
def test_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match=r"dino_head has 64 prototypes, but 1 batches gave \d+ features .* set "
                                         r"continued.head_init_batches>=\d+"):
        build_networks(load_config("quickstart", TINY + ["continued.head_init=kmeans", "continued.head_init_batches=1",
                                                         f"train.output_dir={tmp_path}"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="method 'simclr' has none"):
        build_networks(load_config("quickstart", TINY + ["method=simclr", "continued.head_init=kmeans",
                                                         f"train.output_dir={tmp_path}"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="continued.head_init must be 'random' or 'kmeans', got 'zeros'"):
        build_networks(load_config("quickstart", TINY + ["continued.head_init=zeros"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="continued.backbone_warmup_steps must be >= 0"):
        build_networks(load_config("quickstart", TINY + ["continued.backbone_warmup_steps=-1"]), torch.device("cpu"))


@needs_fmnist
@pytest.mark.distributed
def test_two_ranks_start_from_the_same_heads_and_train_as_one_process(tmp_path, pretrained):
    # FSDP2 over gloo: the k-means features gathered from both ranks in one-process order, rank 0's prototypes on
    # every rank, the backbone frozen in its shards, then the same losses as one process.
    path, weights = pretrained
    extra = ["continued.head_init=kmeans", "continued.head_init_batches=3", "continued.backbone_warmup_steps=2",
             f"model.pretrained_weights={path}", "train.max_steps=4", "train.checkpoint_every=2",
             "train.log_throughput=false"]
    launch(1, tmp_path / "one", *extra)
    launch(2, tmp_path / "two", *extra)
    assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"), range(1, 5))
    a, b = teacher_weights(tmp_path / "one"), teacher_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # at the end of the warm-up the 2-rank teacher's backbone is still the pretrained one, bitwise
    warm = checkpoint.read_dcp_checkpoint(checkpoint.list_checkpoints(tmp_path / "two")[0])
    assert all(torch.equal(warm["teacher"][f"backbone.{k}"], v) for k, v in weights.items())
    ha = torch.load(tmp_path / "one" / "export" / "teacher_heads.pth")
    hb = torch.load(tmp_path / "two" / "export" / "teacher_heads.pth")
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("release,extra", [
    ("dinov2_vits14", []),
    ("dinov2_vits14_reg", ["model.num_register_tokens=4", "model.interpolate_offset=0.0",
                           "model.interpolate_antialias=true"]),
])
def test_the_vits14_recipe_builds_the_released_architecture(tmp_path, release, extra):
    import dinoscale.hub

    torch.manual_seed(0)
    released = dinoscale.hub.load(release)  # the release's architecture (518 px), random weights
    weights = tmp_path / f"{release}.pth"
    torch.save(released.state_dict(), weights)
    cfg = load_config("train/continue_vits14", [f"model.pretrained_weights={weights}", *extra])
    model = build_backbone(cfg.model)
    assert load_pretrained_backbone(model, cfg.model) == "dinov2"
    loaded, source = model.state_dict(), released.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source if k != "pos_embed")
    # 224 px crops: the model's own grid, resampled from the release's as the release resamples it itself
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), released.eval()(x), atol=1e-4, rtol=1e-4)


@needs_fmnist
def test_final_knn_compares_the_continued_network_with_the_pretrained_one(tmp_path, pretrained):
    from dinoscale.train.evaluate import evaluate_knn

    path, weights = pretrained
    small = ["evaluation.final_knn=true", "evaluation.knn_max_train_samples=300", "evaluation.knn_max_test_samples=100"]
    cfg, result = run(tmp_path, path, "train.max_steps=1", *small)
    start = build_backbone(cfg.model, drop_path_rate=0.0)
    start.load_state_dict(weights)
    assert list(result.knn) == ["teacher", "pretrained"]
    assert result.knn["pretrained"] == evaluate_knn(cfg, start, torch.device("cpu"))["knn/top1@20"]
    assert rows(tmp_path, "final_knn")[0]["pretrained"] == result.knn["pretrained"]
