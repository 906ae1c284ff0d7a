"""End-to-end: released-layout checkpoints through dinoscale.hub, the CLIs, and feature files."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoscale import hub
from dinoscale.data.open import open_dataset
from dinoscale.data.sources.fashion_mnist import FashionMNIST
from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.eval.backbones import load_backbone
from dinoscale.eval.extract import extract_features
from dinoscale.eval.transforms import eval_transform
from dinoscale.eval.knn import knn_classify

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = dict(embed_dim=32, depth=2, num_heads=2)
TINY_ARGS = ["--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2"]

needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists() and not (FMNIST / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST IDX files not installed",
)


def tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def released_pth(tmp_path_factory):
    """A tiny random ViT-S/14-layout backbone saved like the official release: a plain state_dict .pth."""
    torch.manual_seed(0)
    model = hub.dinov2_vits14(pretrained=False, **TINY)
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14_tiny_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path, model


@needs_fmnist
def test_knn_on_fashion_mnist_with_released_layout_checkpoint(released_pth):
    path, reference = released_pth
    model = hub.load("dinov2_vits14", weights=str(path), **TINY)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    transform = eval_transform(28, model.patch_size, crop_ratio=1.0)
    train = open_dataset("fashion-mnist:train", transform=transform, max_samples=300)
    test = torch.utils.data.Subset(FashionMNIST(split="test", transform=transform), range(100))
    kw = dict(batch_size=100, autocast_dtype="fp32", progress=False)
    tr, te = extract_features(model, train, **kw), extract_features(model, test, **kw)
    assert tr["cls"].shape == (300, 32) and te["labels"].tolist() == FashionMNIST(split="test").targets[:100].tolist()
    res = knn_classify(tr["cls"], tr["labels"], te["cls"], te["labels"], ks=(10, 20))
    # Random features of a random ViT still cluster Fashion-MNIST far above chance (10%);
    # misaligned labels or features would sit at chance.
    assert res[20]["top1"] > 30.0


@needs_fmnist
def test_eval_knn_cli_writes_json(released_pth, tmp_path, capsys):
    path, _ = released_pth
    out = tmp_path / "knn.json"
    argv = ["--arch", "dinov2_vits14", "--weights", str(path), *TINY_ARGS, "--max-train", "200", "--max-test", "50",
            "--image-size", "28", "--crop-ratio", "1.0", "--ks", "5", "10", "--batch-size", "100",
            "--autocast", "fp32", "--no-progress", "--output-json", str(out)]
    assert tool("eval_knn").main(argv) == 0
    report = json.loads(out.read_text())
    assert report["num_train"] == 200 and report["num_test"] == 50 and report["image_size"] == 28
    assert set(report["results"]) == {"5", "10"}
    assert 0 <= report["results"]["10"]["top1"] <= 100
    assert "top-1" in capsys.readouterr().out
    # The pixel baseline needs no backbone.
    pix = tmp_path / "pixels.json"
    argv = ["--pixels", "--max-train", "200", "--max-test", "50", "--image-size", "28", "--crop-ratio", "1.0",
            "--ks", "10", "--no-progress", "--output-json", str(pix)]
    assert tool("eval_knn").main(argv) == 0
    assert json.loads(pix.read_text())["results"]["10"]["top1"] > 40.0


@needs_fmnist
def test_eval_linear_cli_both_modes(released_pth, tmp_path):
    path, _ = released_pth
    out = tmp_path / "linear.json"
    argv = ["--arch", "dinov2_vits14", "--weights", str(path), *TINY_ARGS, "--max-train", "200", "--max-test", "50",
            "--image-size", "28", "--crop-ratio", "1.0", "--mode", "both", "--n-last-blocks", "1", "2", "--lrs", "0.01", "0.1", "--epochs", "3",
            "--Cs", "0.1", "10", "--autocast", "fp32", "--no-progress", "--output-json", str(out)]
    assert tool("eval_linear").main(argv) == 0
    report = json.loads(out.read_text())
    assert len(report["linear"]["grid"]) == 2 * 2 * 2
    assert report["linear"]["num_train"] + report["linear"]["num_val"] == 200
    assert 0 <= report["linear"]["test_top1"] <= 100
    assert [r["C"] for r in report["logreg"]["grid"]] == [0.1, 10.0]


def _image_folder(root: Path, corrupt: bool):
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"img{i}.png")
    if corrupt:
        (root / "class1" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def test_extract_features_cli_safetensors_and_npy(released_pth, tmp_path, capsys):
    from safetensors import safe_open

    path, _ = released_pth
    folder = tmp_path / "images"
    _image_folder(folder, corrupt=True)
    out = tmp_path / "feats.safetensors"
    base = ["--arch", "dinov2_vits14", "--weights", str(path), *TINY_ARGS, "--data", str(folder),
            "--image-size", "28", "--batch-size", "3", "--autocast", "fp32", "--no-progress"]
    assert tool("extract_features").main([*base, "--output", str(out), "--pooled-patches"]) == 0
    assert "skipped 1 unreadable" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        names = json.loads(meta["file_names"])
        cls, labels, patch_mean = f.get_tensor("cls"), f.get_tensor("labels"), f.get_tensor("patch_mean")
    assert meta["num_skipped"] == "1" and meta["image_size"] == "28"
    # The corrupt file is dropped, not replaced by its neighbour: names and labels stay aligned.
    assert names == [f"class0/img{i}.png" for i in range(4)] + ["class1/img0.png", "class1/img2.png", "class1/img3.png"]
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert cls.shape == (7, 32) and patch_mean.shape == (7, 32)

    npy = tmp_path / "feats.npy"
    assert tool("extract_features").main([*base, "--output", str(npy)]) == 0
    np.testing.assert_allclose(np.load(npy), cls.numpy(), rtol=1e-5, atol=1e-5)
    assert np.load(tmp_path / "feats_labels.npy").tolist() == labels.tolist()
    assert json.loads((tmp_path / "feats_files.json").read_text())["file_names"] == names


def test_image_folder_skip_in_library_path(tmp_path):
    folder = tmp_path / "images"
    _image_folder(folder, corrupt=True)
    torch.manual_seed(0)
    model = hub.dinov2_vits14(pretrained=False, **TINY)
    ds = ImageFolderDataset(folder, transform=eval_transform(28, 14))
    out = extract_features(model, ds, batch_size=4, autocast_dtype="fp32", progress=False)
    assert out["num_skipped"] == 1 and out["indices"].tolist() == [0, 1, 2, 3, 4, 6, 7]
    # Red vs blue images: kNN separates the two classes perfectly (leave-one-out style split).
    res = knn_classify(out["cls"][::2], out["labels"][::2], out["cls"][1::2], out["labels"][1::2], ks=(1,))
    assert res[1]["top1"] == 100.0


def test_load_backbone_from_config_and_run_directory(tmp_path):
    from dinoscale.checkpoint import save_backbone
    from dinoscale.config import load_config, save_config
    from dinoscale.models.factory import build_backbone

    overrides = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "model.img_size=32"]
    cfg = load_config(None, overrides)
    torch.manual_seed(1)
    trained = build_backbone(cfg.model, drop_path_rate=0.0)
    # A training-style checkpoint dict: the teacher's backbone under a prefix.
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    model = load_backbone(config=str(REPO / "configs" / "default.yaml"), overrides=overrides, weights=str(ckpt))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    # A run directory: config.yaml + export/teacher_backbone.safetensors.
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    save_backbone(trained.state_dict(), run / "export" / "teacher_backbone")
    model = load_backbone(weights=str(run))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), trained.eval()(x))
    with pytest.raises(ValueError, match="unknown arch"):
        load_backbone("vit_tiny_unknown")


def test_visualize_cli_writes_pngs(released_pth, tmp_path):
    path, _ = released_pth
    out = tmp_path / "viz"
    argv = ["--arch", "dinov2_vits14", "--weights", str(path), *TINY_ARGS, "--images", "astronaut",
            "--image-size", "56", "--output-dir", str(out)]
    assert tool("visualize").main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["astronaut_attention.png", "astronaut_attn_mean.png", "astronaut_attn_head0.png",
                            "astronaut_attn_head1.png", "astronaut_pca.png", "astronaut_pca_figure.png",
                            "pca_grid.png"])
    with Image.open(out / "astronaut_pca.png") as im:
        assert im.size == (56, 56)


@needs_fmnist
def test_a_dinov3_backbone_through_the_linear_probe_and_the_pictures(tmp_path):
    """The released DINOv3 layout (official .pth, 4 storage tokens, RoPE) through eval_linear (the last two
    blocks' class tokens: get_intermediate_layers) and visualize (attention past the storage tokens, PCA)."""
    torch.manual_seed(0)
    path = tmp_path / "dinov3_vits16_tiny_pretrain.pth"
    torch.save(hub.dinov3_vits16(pretrained=False, patch_size=4, **TINY).state_dict(), path)
    base = ["--arch", "dinov3_vits16", "--weights", str(path), *TINY_ARGS, "--model-arg", "patch_size=4"]
    out = tmp_path / "linear.json"
    assert tool("eval_linear").main([
        *base, "--max-train", "100", "--max-test", "20", "--image-size", "28", "--crop-ratio", "1.0", "--mode",
        "linear", "--n-last-blocks", "1", "2", "--lrs", "0.01", "--epochs", "1", "--autocast", "fp32",
        "--no-progress", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())["linear"]
    assert len(report["grid"]) == 2 * 2 and 0 <= report["test_top1"] <= 100
    viz = tmp_path / "viz"
    assert tool("visualize").main([*base, "--images", "coffee", "--image-size", "32", "--output-dir", str(viz)]) == 0
    assert sorted(p.name for p in viz.iterdir()) == sorted([
        "coffee_attention.png", "coffee_attn_mean.png", "coffee_attn_head0.png", "coffee_attn_head1.png",
        "coffee_pca.png", "coffee_pca_figure.png", "pca_grid.png"])
    with Image.open(viz / "coffee_attn_mean.png") as im:
        assert im.size == (48, 32)  # 400 x 600 -> 32 x 48, patch multiples


def test_plot_metrics_cli_writes_png(tmp_path):
    rows = []
    for step in range(1, 31):
        rows.append({"step": step, "loss": 12.0 / step, "loss/dino": 9.0 / step, "loss/ibot": 3.0 / step,
                     "lr": 1e-3 * min(1.0, step / 10), "wd": 0.04, "images_per_s": 100.0})
        if step % 10 == 0:
            rows.append({"type": "eval", "step": step, "knn/top1@20": 30.0 + step, "knn/top5@20": 60.0 + step})
    rows.append({"type": "final_knn", "step": 30, "teacher": 60.0, "random_init": 25.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 31, \"loss\": 0.3")  # torn last line
    plot = tool("plot_metrics")
    assert plot.main([str(tmp_path)]) == 0
    png = tmp_path / "metrics.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 600  # three panels
    # Only training rows: two panels, still a PNG; nothing plottable: a clear error.
    path.write_text("\n".join(json.dumps(r) for r in rows if "type" not in r))
    assert plot.main([str(path), "--output", str(tmp_path / "two.png")]) == 0
    path.write_text(json.dumps({"step": 1, "images_per_s": 3.0}) + "\n")
    with pytest.raises(SystemExit, match="no loss, lr or knn"):
        plot.main([str(path)])
