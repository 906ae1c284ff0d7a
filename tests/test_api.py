"""The Python API (dinoscale.api): ``dinoscale.pretrain`` in this process, ``dinoscale.embed`` of images."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

import dinoscale
from dinoscale import hub
from dinoscale.api import PretrainResult, embed, pretrain, resolve_config
from dinoscale.config import ConfigError, load_config
from dinoscale.eval.backbones import load_backbone
from dinoscale.eval.transforms import eval_transform
from dinoscale.models.factory import build_backbone
from dinoscale.train.cli import training_process
from tests.train.test_loop import FMNIST, TINY

REPO = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
# the loop tests' tiny run, as the nested mapping pretrain's overrides take (values parsed as the CLI parses them)
TINY_OVERRIDES = OmegaConf.to_container(OmegaConf.from_dotlist(TINY))


def test_package_exports_the_api_lazily():
    assert dinoscale.pretrain is pretrain and dinoscale.embed is embed and dinoscale.PretrainResult is PretrainResult
    assert {"pretrain", "embed"} <= set(dir(dinoscale))
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        dinoscale.trian
    # importing a light module of the package does not import the API (tools/submit.py runs without torch)
    probe = "import sys, dinoscale.launch; assert 'torch' not in sys.modules and 'dinoscale.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


# ---------------------------------------------------------------------------------------------------- config
def test_config_forms_match_the_command_line(tmp_path):
    cli = load_config("quickstart", ["train.max_steps=20", "optim.base_lr=1e-3", "crops.global_crops_scale=[0.3, 1.0]",
                                     "train.build_shards_from=null"])
    assert resolve_config("quickstart", {"train.max_steps": 20, "optim.base_lr": 1e-3,
                                         "crops.global_crops_scale": [0.3, 1.0], "train.build_shards_from": None}) == cli
    nested = {"train": {"max_steps": 20, "build_shards_from": None}, "optim": {"base_lr": 1e-3},
              "crops": {"global_crops_scale": (0.3, 1.0)}}
    assert resolve_config("quickstart", nested) == cli
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(OmegaConf.to_yaml(OmegaConf.load(REPO / "configs" / "quickstart.yaml")))
    assert resolve_config(yaml_path, nested) == cli
    # a mapping or an OmegaConf config as the config itself (its interpolations resolved within it)
    recipe = OmegaConf.load(REPO / "configs" / "quickstart.yaml")
    assert resolve_config(recipe, nested) == cli
    assert resolve_config(OmegaConf.to_container(recipe), nested) == cli
    recipe.train.output_dir = "${train.dataset}-run"
    assert resolve_config(recipe).train.output_dir == "./data/fashion-mnist-shards/train-run"
    assert resolve_config() == load_config()
    # strings stay strings, even when they look like YAML
    assert resolve_config(overrides={"trackers.run_name": "123"}).trackers.run_name == "123"
    assert resolve_config(overrides={"train.output_dir": tmp_path / "a: b"}).train.output_dir == str(tmp_path / "a: b")


def test_bad_configs_raise_instead_of_exiting():
    with pytest.raises(ConfigError, match="unknown config key 'train.max_stepz'; did you mean 'train.max_steps'"):
        resolve_config("quickstart", {"train.max_stepz": 3})
    with pytest.raises(ConfigError, match="'train.max_steps' expects a int or null, got str"):
        resolve_config(overrides={"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="config value of 'optim.base_lr' must be a string, number"):
        resolve_config(overrides={"optim.base_lr": float("nan")})
    with pytest.raises(ConfigError, match="cannot resolve the config's interpolations"):
        resolve_config(OmegaConf.create({"train": {"output_dir": "${train.nothing}"}}))
    with pytest.raises(ConfigError, match="config file not found"):
        pretrain("configs/no_such.yaml")
    with pytest.raises(TypeError, match=r"overrides must be a mapping such as \{'train.max_steps': 20\}"):
        pretrain("quickstart", overrides=["train.max_steps=20"])
    with pytest.raises(TypeError, match="config must be a path, a config name, a mapping or None"):
        pretrain(42)


# ---------------------------------------------------------------------------------------------------- pretrain
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run through the API: (its output dir, its result, the rows it logged)."""
    out = tmp_path_factory.mktemp("api-run")
    before = signal.getsignal(signal.SIGTERM)
    result = pretrain("quickstart", overrides={**TINY_OVERRIDES, "train": {
        **TINY_OVERRIDES["train"], "output_dir": str(out), "max_steps": 2, "checkpoint_every": 2}})
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers it installed are gone
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, result, rows


@needs_fmnist
def test_pretrain_returns_the_run_and_a_second_call_resumes_it(trained):
    out, result, rows = trained
    assert result == PretrainResult(status="finished", step=2, output_dir=out, knn=None,
                                    metrics_path=out / "metrics.jsonl",
                                    backbone_path=out / "export" / "teacher_backbone.safetensors")
    assert result.backbone_path.is_file() and [r["step"] for r in rows] == [1, 2]

    again = pretrain("quickstart", overrides={**TINY_OVERRIDES, "train.output_dir": out, "train.max_steps": 3})
    assert (again.status, again.step) == ("finished", 3)
    resumed = [json.loads(line) for line in again.metrics_path.read_text().splitlines()]
    assert resumed[:2] == rows and resumed[2]["step"] == 3  # steps 1-2 kept from the first call, not rerun


def test_training_process_leaves_a_process_group_it_did_not_create(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with training_process() as stop:
            assert stop is not None and stop() is False
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    with training_process():
        pass
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------------- embed
@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    model = build_backbone("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    """Five uint8 images of different sizes' worth of content, as one [N, 3, H, W] batch."""
    return torch.randint(0, 256, (5, 3, 20, 26), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def manual_cls(model, batch, image_size):
    """The backbone's forward on the evaluation transform of each image, done by hand."""
    transform = eval_transform(image_size, model.patch_size)
    x = torch.stack([transform(image) for image in batch])
    with torch.no_grad():
        return model.forward_features(x)["x_norm_clstoken"]


def test_embed_equals_a_manual_forward_on_the_normalised_input(backbone, images):
    features = embed(backbone, images, image_size=16, autocast_dtype="fp32", batch_size=2)
    expected = manual_cls(backbone, images, 16)
    assert features.shape == (5, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the module's own forward returns the same normalised CLS token
        torch.testing.assert_close(backbone(torch.stack([eval_transform(16, 4)(i) for i in images])), expected)
    # float images in [0, 1] are the same images
    torch.testing.assert_close(embed(backbone, images.float() / 255, image_size=16, autocast_dtype="fp32"), features,
                               rtol=1e-5, atol=1e-5)
    # default image size 224 (the standard evaluation crop), default autocast: bf16 where fast, so only close
    big = embed(backbone, images[:2])
    torch.testing.assert_close(big, manual_cls(backbone, images[:2], 224), rtol=0.05, atol=0.05)


class PairDataset(Dataset):
    def __init__(self, pictures):
        self.pictures = pictures

    def __len__(self):
        return len(self.pictures)

    def __getitem__(self, index):
        return self.pictures[index], index % 2


def test_embed_takes_pil_images_paths_a_folder_and_a_dataset(backbone, images, tmp_path):
    expected = embed(backbone, images, image_size=16, autocast_dtype="fp32")
    pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    paths = []
    for index, picture in enumerate(pictures):
        paths.append(tmp_path / "photos" / f"{index:02d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        picture.save(paths[-1])
    for data in (pictures, paths, [str(p) for p in paths], tmp_path / "photos", str(tmp_path / "photos"),
                 PairDataset(pictures)):
        features = embed(backbone, data, image_size=16, autocast_dtype="fp32")
        torch.testing.assert_close(features, expected, rtol=0, atol=0, msg=lambda m: f"{type(data).__name__}: {m}")


def test_embed_a_hub_model_with_local_weights(tmp_path, images):
    torch.manual_seed(2)
    weights = tmp_path / "vits14.pth"
    torch.save(hub.load("dinov2_vits14").state_dict(), weights)
    features = embed("dinov2_vits14", images[:2], weights=weights, image_size=28, autocast_dtype="fp32")
    model = hub.load("dinov2_vits14", weights=str(weights)).eval()
    assert features.shape == (2, 384)
    torch.testing.assert_close(features, manual_cls(model, images[:2], 28), rtol=1e-5, atol=1e-5)


@needs_fmnist
def test_embed_a_run_directory_its_export_and_its_checkpoint(trained, images):
    out = trained[0]
    model = load_backbone(weights=str(out))
    run_size = load_config(out / "config.yaml").evaluation.knn_image_size  # the run's own evaluation size
    expected = manual_cls(model, images, run_size)
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    for source in (out, str(out), out / "export" / "teacher_backbone.safetensors", checkpoint):
        torch.testing.assert_close(embed(source, images, autocast_dtype="fp32"), expected, rtol=1e-5, atol=1e-5)


def test_embed_rejects_bad_inputs_with_clear_errors(backbone, images, tmp_path):
    picture = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"one PIL image: pass a list, \[image\]"):
        embed(backbone, picture)
    picture.save(tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"one.png is one image file: pass a list, \[path\]"):
        embed(backbone, tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"must have shape \[N, C, H, W\], got \(3, 20, 26\)"):
        embed(backbone, images[0])
    with pytest.raises(ValueError, match="empty list"):
        embed(backbone, [])
    with pytest.raises(TypeError, match="data must be a .* got int"):
        embed(backbone, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"2 of the images could not be read \(#1: .*missing.png.*; #2: .*"):
        embed(backbone, [tmp_path / "one.png", tmp_path / "missing.png", tmp_path / "broken.png"], image_size=16)
    with pytest.raises(FileNotFoundError, match="'dinov2_vits15' is neither a hub name .* nor an existing run"):
        embed("dinov2_vits15", images)
    torch.save(backbone.state_dict(), tmp_path / "loose.pth")
    with pytest.raises(ValueError, match="not inside a training run .* architecture is unknown"):
        embed(tmp_path / "loose.pth", images)
    with pytest.raises(ValueError, match="weights= goes with a hub name"):
        embed(backbone, images, weights=tmp_path / "loose.pth")
    with pytest.raises(TypeError, match="model must be an nn.Module, a hub name"):
        embed(None, images)
