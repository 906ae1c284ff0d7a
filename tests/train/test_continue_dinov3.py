"""Continuing from a released DINOv3 backbone (``model.pretrained_weights`` with ``model.arch: dinov3_*``): tiny
random DINOv3 models of the reference libraries (transformers' DINOv3ViTModel saved with save_pretrained, timm's
vit_small_patch16_dinov3 saved as safetensors) and the official layout start a tiny run whose backbone gives the
library's own features; other architectures are refused before training, naming what differs and what fits."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.models.factory import build_backbone
from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer
from dinoscale.train import loop
from dinoscale.train.build import build_networks
from dinoscale.train.continue_from import PretrainedArchitectureError, load_pretrained_backbone
from tests.hub.conftest import randomize_
from tests.tiny import TINY_RUN

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

# tests/train/test_dinov3_training.py's tiny DINOv3 run: dinov3_vits16 at width 32, depth 2, 2 heads, 4 px patches
DINOV3 = [*TINY_RUN, "model.arch=dinov3_vits16", "optim.base_lr=0.001", "train.log_throughput=false"]
SIZES = [(16, 16), (16, 24)]


def hf_dinov3(seed: int = 0) -> DINOv3ViTModel:
    """DINOv3ViTModel with dinov3_vits16's layout at DINOV3's tiny size (GELU MLP of 4x width, 4 storage tokens,
    LayerScale, no key bias), non-trivial random weights."""
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4,
                             patch_size=4, image_size=16, intermediate_size=128, layerscale_value=1e-5,
                             layer_norm_eps=1e-5, rope_theta=100.0)
    return randomize_(DINOv3ViTModel(config), seed).eval()


def timm_dinov3(seed: int = 0) -> torch.nn.Module:
    """timm's vit_small_patch16_dinov3 (no qkv bias: it loads as a zero bias) at DINOV3's tiny size."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                              patch_size=4, img_size=16, num_classes=0)
    return randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = hf_dinov3()
    folder = tmp_path_factory.mktemp("hf") / "dinov3-tiny"
    model.save_pretrained(folder)
    return folder, model


def hf_tokens(model: DINOv3ViTModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def timm_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)


def assert_library_features(backbone: DinoV3VisionTransformer, reference, tokens_of) -> None:
    """Our [CLS], storage and patch tokens equal the library's ``[cls, registers, patches]`` at two image sizes."""
    backbone.eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            out = backbone.forward_features(x)
        ref = tokens_of(reference, x)
        torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["x_storage_tokens"], ref[:, 1:5], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 5:], rtol=0, atol=1e-5)


def config(weights, *extra):
    return load_config("quickstart", DINOV3 + [f"model.pretrained_weights={weights}", *extra])


@needs_fmnist
def test_a_run_continues_from_a_hugging_face_folder_with_its_features(tmp_path, hf_folder):
    folder, hf = hf_folder
    cfg = config(folder, "continued.head_init=kmeans", "continued.head_init_batches=4",
                 "continued.backbone_warmup_steps=2", f"train.output_dir={tmp_path}")
    # step 0: the student's backbone (and the teacher, its copy) compute the Hugging Face model's features
    _, student, teacher = build_networks(cfg, torch.device("cpu"))
    assert isinstance(student["backbone"], DinoV3VisionTransformer)
    assert_library_features(student["backbone"], hf, hf_tokens)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())
    # a few steps: the backbone is frozen during the heads-only warm-up, so the teacher after step 2 still is the
    # Hugging Face model; then it moves
    result = loop.train(load_config("quickstart", DINOV3 + [
        f"model.pretrained_weights={folder}", "continued.head_init=kmeans", "continued.head_init_batches=4",
        "continued.backbone_warmup_steps=2", f"train.output_dir={tmp_path}", "train.max_steps=3",
        "train.checkpoint_every=1", "train.keep_checkpoints=5"]))
    assert result.status == "finished" and result.step == 3
    states = {int(p.name.split("_")[1]): checkpoint.read_dcp_checkpoint(p)
              for p in checkpoint.list_checkpoints(tmp_path)}
    warm = build_backbone(cfg.model, drop_path_rate=0.0)
    warm.load_state_dict({k[len("backbone."):]: v for k, v in states[2]["teacher"].items()
                          if k.startswith("backbone.")})
    assert_library_features(warm, hf, hf_tokens)
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert torch.equal(states[2]["student"][qkv], states[1]["student"][qkv])
    assert not torch.equal(states[3]["student"][qkv], states[2]["student"][qkv])


def test_timm_and_official_layouts_start_the_student(tmp_path):
    reference = timm_dinov3(seed=1)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "timm.safetensors")
    cfg = config(tmp_path / "timm.safetensors", f"train.output_dir={tmp_path / 'timm'}")
    _, student, _ = build_networks(cfg, torch.device("cpu"))
    assert_library_features(student["backbone"], reference, timm_tokens)
    assert not student["backbone"].blocks[0].attn.qkv.bias.any()  # timm's model has none: zero, as its function
    # the official layout (what a dinoscale DINOv3 run exports): every entry, bitwise
    torch.manual_seed(2)
    official = build_backbone(cfg.model)
    torch.save(official.state_dict(), tmp_path / "official.pth")
    cfg = config(tmp_path / "official.pth", f"train.output_dir={tmp_path / 'official'}")
    _, student, _ = build_networks(cfg, torch.device("cpu"))
    loaded = student["backbone"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in official.state_dict().items())


def refusal(cfg) -> str:
    with pytest.raises(PretrainedArchitectureError) as info:
        load_pretrained_backbone(build_backbone(cfg.model), cfg.model)
    return str(info.value)


def test_another_size_names_the_differences_and_the_settings_that_fit(hf_folder):
    folder, _ = hf_folder
    message = refusal(config(folder, "model.depth=3"))
    assert message.startswith(
        f"model.pretrained_weights={folder} does not fit the configured model (depth differ): the checkpoint has "
        "embed_dim 32, depth 2, patch 4, 4 storage tokens, mlp FFN of width 128, with qkv bias, with LayerScale; "
        "the config (model.arch=dinov3_vits16) builds embed_dim 32, depth 3, 2 heads, patch 4, 4 storage tokens, "
        "mlp FFN of width 128, with qkv bias, with LayerScale. To continue from these weights set model.depth=2\n"
    ), message
    assert "missing keys" in message  # the hub's key-level listing follows
    # the SwiGLU arch of the same sizes: the FFN differs, the plain arch fits
    message = refusal(config(folder, "model.arch=dinov3_vits16plus"))
    assert "(ffn differ)" in message and "swiglu FFN of width 128" in message
    assert "set model.arch=dinov3_vits16\n" in message


@pytest.fixture(scope="module")
def released_vits16(tmp_path_factory):
    """dinov3_vits16 with the release's architecture and random weights, saved in the official layout."""
    import dinoscale.hub

    torch.manual_seed(0)
    released = dinoscale.hub.load("dinov3_vits16")
    weights = tmp_path_factory.mktemp("released") / "dinov3_vits16_pretrain.pth"
    torch.save(released.state_dict(), weights)
    return weights, released.eval()


def test_a_released_size_names_its_arch_and_the_head_count_of_official_weights(released_vits16):
    weights, _ = released_vits16
    message = refusal(config(weights, "model.arch=dinov3_vitb16"))  # at DINOV3's width 32
    assert "(embed_dim, depth, patch_size, num_heads, ffn_hidden differ): the checkpoint has embed_dim 384, depth " \
           "12, 6 heads, patch 16, 4 storage tokens, mlp FFN of width 1536," in message
    assert "set model.arch=dinov3_vits16 model.embed_dim=null model.depth=null model.num_heads=null " \
           "model.patch_size=16\n" in message


def test_the_other_model_family_is_named_both_ways(tmp_path, hf_folder):
    folder, _ = hf_folder
    message = refusal(config(folder, "model.arch=vit_small"))  # DINOv3 weights, a DINOv2-layout config
    assert "(a DINOv3 ViT checkpoint): the checkpoint is a DINOv3 ViT (RoPE) with embed_dim 32" in message
    assert "the config (model.arch=vit_small) builds a DINOv2-layout ViT (learned position embedding) with" in message
    assert message.split("\n")[0].endswith("To continue from these weights set model.arch=dinov3_vits16")
    dinov2 = build_backbone(load_config("quickstart", TINY_RUN).model)
    torch.save(dinov2.state_dict(), tmp_path / "dinov2.pth")
    message = refusal(config(tmp_path / "dinov2.pth"))  # DINOv2 weights, a DINOv3 config
    assert "(a DINOv2-layout ViT checkpoint): the checkpoint is a DINOv2-layout ViT" in message
    assert message.split("\n")[0].endswith("To continue from these weights set model.arch=vit_small")


@needs_fmnist
def test_a_mismatch_stops_the_run_before_training(tmp_path, hf_folder):
    folder, _ = hf_folder
    with pytest.raises(PretrainedArchitectureError, match=r"\(embed_dim, ffn_hidden differ\)"):
        loop.train(config(folder, "model.embed_dim=48", f"train.output_dir={tmp_path}", "train.max_steps=1"))
    assert not (tmp_path / "metrics.jsonl").exists() and checkpoint.latest_checkpoint(tmp_path) is None


def test_the_vits16_recipe_builds_the_released_architecture(released_vits16):
    weights, released = released_vits16
    cfg = load_config("train/continue_dinov3_vits16", [f"model.pretrained_weights={weights}"])
    model = build_backbone(cfg.model)
    assert load_pretrained_backbone(model, cfg.model) == "dinov3"
    source = released.state_dict()
    assert model.state_dict().keys() == source.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), released(x), rtol=0, atol=1e-5)
