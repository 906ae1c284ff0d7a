"""The DINOv3 ViT (``model.arch: dinov3_*``) in the training engine: method dinov2 end to end on Fashion-MNIST
(multi-crop, iBOT masks, checkpoint/resume, export, final kNN, evaluation loading of the run directory), and its
FSDP2 wrapping on two gloo ranks."""

import json
from pathlib import Path

import pytest
import torch

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.eval.backbones import load_backbone
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
from dinoscale.train import loop
from dinoscale.train.build import optimizer_from_config
from dinoscale.methods.registry import build_method
from tests.tiny import TINY_RUN

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

# A 2-block, 32-wide DINOv3 ViT with 4 px patches (the release's RoPE, storage tokens, LayerScale, masked key bias)
DINOV3 = [*TINY_RUN, "model.arch=dinov3_vits16", "model.drop_path_rate=0.1", "optim.base_lr=0.001"]


def rows(out_dir):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in lines if "type" not in r}


def test_optimizer_groups_use_the_dinov3_metadata():
    cfg = load_config("quickstart", DINOV3 + ["optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2"])
    student, _ = build_method(cfg).build_networks()
    backbone = student["backbone"]
    assert isinstance(backbone, DinoV3VisionTransformer) and backbone.patch_size == 4 and backbone.n_blocks == 2
    groups = optimizer_from_config(cfg, student).param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    lr = {n: by_param[id(p)]["lr_multiplier"] for n, p in named.items()}
    wd = {n: by_param[id(p)]["wd_multiplier"] for n, p in named.items()}
    # layer-wise decay 0.5 over depth 2: tokens 0.5^3, block i 0.5^(2 - i), final norm and heads 1
    assert lr["backbone.cls_token"] == lr["backbone.storage_tokens"] == lr["backbone.mask_token"] == 0.125
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.125 * 0.2)
    assert lr["backbone.blocks.0.attn.qkv.weight"] == 0.25 and lr["backbone.blocks.1.mlp.fc1.weight"] == 0.5
    assert lr["backbone.norm.weight"] == lr["dino_head.mlp.0.weight"] == 1.0
    # no decay on the tokens, LayerScale, norms and biases; decay on the matrices
    for name in ("cls_token", "storage_tokens", "mask_token", "blocks.0.ls1.gamma", "norm.weight",
                 "blocks.0.attn.qkv.bias"):
        assert wd[f"backbone.{name}"] == 0.0, name
    assert wd["backbone.blocks.0.attn.qkv.weight"] == 1.0
    # the buffers (RoPE periods, the key-bias mask) are not optimized
    assert "backbone.rope_embed.periods" not in named and "backbone.blocks.0.attn.qkv.bias_mask" not in named


@needs_fmnist
def test_dinov3_trains_resumes_exactly_exports_and_evaluates(tmp_path):
    knn = ["evaluation.final_knn=true", "evaluation.knn_train_dataset=fashion-mnist:train",
           "evaluation.knn_test_dataset=fashion-mnist:test", "evaluation.knn_max_train_samples=64",
           "evaluation.knn_max_test_samples=32", "evaluation.knn_image_size=16"]
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = load_config("quickstart", DINOV3 + ["train.max_steps=4", f"train.output_dir={full}", *knn])
    result = loop.train(cfg)
    assert result.status == "finished" and result.step == 4 and set(result.knn) == {"teacher", "random_init"}
    # the same run stopped after step 2 (a checkpoint), then resumed to step 4
    loop.train(load_config("quickstart", DINOV3 + ["train.max_steps=2", f"train.output_dir={part}"]))
    assert checkpoint.latest_checkpoint(part).name == "step_000000002"
    loop.train(load_config("quickstart", DINOV3 + ["train.max_steps=4", f"train.output_dir={part}"]))
    a, b = rows(full), rows(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # RNG (drop path, RoPE rescaling), data position and weights come back exactly
        for key in ("loss", "loss/dino_global", "loss/dino_local", "loss/koleo", "loss/ibot", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    exported = torch.load(full / "export" / "teacher_backbone.pth")
    resumed = torch.load(part / "export" / "teacher_backbone.pth")
    assert exported.keys() == resumed.keys() and all(torch.equal(exported[k], resumed[k]) for k in exported)
    # the export is the official DINOv3 layout; evaluation loads the run directory by its config
    assert "storage_tokens" in exported and "blocks.0.attn.qkv.bias_mask" in exported
    model = load_backbone(weights=str(full))
    assert isinstance(model, DinoV3VisionTransformer)
    assert all(torch.equal(model.state_dict()[k], exported[k]) for k in exported)


@needs_fmnist
@pytest.mark.distributed
def test_dinov3_trains_sharded_on_two_ranks(tmp_path):
    from tests.test_train_distributed import launch

    assert launch(2, tmp_path, "model.arch=dinov3_vits16", "train.max_steps=2") == 2
    state = checkpoint.read_dcp_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    final = torch.load(tmp_path / "export" / "teacher_backbone.pth")
    assert {f"backbone.{k}" for k in final} <= set(state["teacher"])
    for k in final:  # the end-of-training export gathered from the shards is the checkpoint's teacher
        assert torch.equal(state["teacher"][f"backbone.{k}"], final[k]), k
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows(tmp_path).values())
