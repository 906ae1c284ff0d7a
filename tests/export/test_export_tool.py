"""tools/export.py end to end on a real (tiny) training run: every target loads in its library with the run's
features, and the command's errors are readable."""

import importlib.util
import json
from pathlib import Path

import onnxruntime
import pytest
import timm
import torch
import transformers

from dinoscale.checkpoint import export_from_checkpoint, latest_checkpoint
from dinoscale.eval.backbones import load_backbone
from dinoscale.hub import load_state_dict_any
from tests.export.conftest import assert_close_tokens, assert_same_tokens

REPO = Path(__file__).resolve().parents[2]


def export_tool():
    spec = importlib.util.spec_from_file_location("tool_export", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def run_backbone(trained_run):
    return load_backbone(weights=str(trained_run))  # the run's exported teacher, as the evaluation tools see it


def images(batch, h, w, seed=0):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_run_directory_to_hugging_face(trained_run, run_backbone, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_tool()([str(trained_run), "--to", "hf", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == [str(out / "config.json"), str(out / "model.safetensors")]
    # the quickstart keeps the original release's resize, which Dinov2Model does not do: said, not hidden
    assert "outputs agree at 16x16 only" in printed.err
    hf = transformers.Dinov2Model.from_pretrained(out).eval()
    x = images(2, 16, 16)
    with torch.no_grad():
        assert_same_tokens(hf(pixel_values=x).last_hidden_state, run_backbone.forward_features(x), 0)


def test_checkpoint_to_timm(trained_run, run_backbone, tmp_path):
    out = tmp_path / "timm"
    assert export_tool()([str(latest_checkpoint(trained_run)), "--to", "timm", "--output", str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = images(2, 16, 16)
    with torch.no_grad():
        assert_same_tokens(model.forward_features(x), run_backbone.forward_features(x), 0)


def test_exported_weights_to_onnx(trained_run, run_backbone, tmp_path):
    out = tmp_path / "fm.onnx"
    weights = trained_run / "export" / "teacher_backbone.safetensors"
    assert export_tool()([str(weights), "--to", "onnx", "--output", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, (h, w) in [(1, (16, 16)), (4, (28, 20))]:
        x = images(batch, h, w)
        cls, patches = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            ours = run_backbone.forward_features(x)
        assert_close_tokens(torch.from_numpy(cls), ours["x_norm_clstoken"])
        assert_close_tokens(torch.from_numpy(patches), ours["x_norm_patchtokens"])


def test_official_layout_equals_export_backbone(trained_run, run_backbone, tmp_path):
    assert export_tool()([str(trained_run), "--to", "official", "--output", str(tmp_path / "a" / "fm")]) == 0
    # tools/export_backbone.py's function on the newest checkpoint: the same teacher, the same files
    export_from_checkpoint(latest_checkpoint(trained_run), tmp_path / "b" / "fm")
    for name in ("fm.pth", "fm.safetensors"):
        a = load_backbone(config=str(trained_run / "config.yaml"), weights=str(tmp_path / "a" / name))
        b = load_backbone(config=str(trained_run / "config.yaml"), weights=str(tmp_path / "b" / name))
        for (key, value), other in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(value, other), key
            assert torch.equal(value, run_backbone.state_dict()[key]), key


def test_hub_name_with_weights_and_model_args(tmp_path):
    from dinoscale import hub

    torch.manual_seed(0)
    model = hub.load("dinov2_vits14_reg", embed_dim=32, depth=2, num_heads=2).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    argv = ["dinov2_vits14_reg", "--weights", str(tmp_path / "w.pth"), "--model-arg", "embed_dim=32",
            "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--to", "hf", "--output", str(tmp_path / "hf")]
    assert export_tool()(argv) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_register_tokens"] == 4
    back = hub.load("dinov2_vits14_reg", embed_dim=32, depth=2, num_heads=2)
    load_state_dict_any(back, tmp_path / "hf")
    for (key, value), other in zip(back.state_dict().items(), model.state_dict().values()):
        assert torch.equal(value, other), key


def test_errors(trained_run, tmp_path, capsys):
    main = export_tool()
    with pytest.raises(SystemExit) as exc:
        main([str(trained_run), "--to", "tflite", "--output", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err

    assert main([str(tmp_path / "missing_run"), "--to", "hf", "--output", str(tmp_path / "x")]) == 2
    assert "error: source not found" in capsys.readouterr().err

    out = tmp_path / "hf"
    assert main([str(trained_run), "--to", "hf", "--output", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main([str(trained_run), "--to", "hf", "--output", str(out)]) == 2
    assert "error: output exists" in capsys.readouterr().err
    assert main([str(trained_run), "--to", "hf", "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() == before

    tiny = ["--model-arg", "embed_dim=32", "--model-arg", "depth=1", "--model-arg", "num_heads=2"]
    assert main(["vit_small", *tiny, "--to", "official", "--output", str(tmp_path / "random")]) == 0
    assert "no --weights given: the export holds randomly initialised weights" in capsys.readouterr().err

    # a backbone the target cannot represent (random weights: no --weights)
    args = ["vit_small", "--model-arg", "mlp_ratio=2.5", "--model-arg", "depth=1", "--to", "hf",
            "--output", str(tmp_path / "ratio")]
    assert main(args) == 2
    assert "error: Hugging Face's Dinov2Config takes an integer mlp_ratio" in capsys.readouterr().err
    assert not (tmp_path / "ratio").exists()


@pytest.fixture(scope="module")
def dinov3_run(tmp_path_factory):
    """A tiny DINOv3 run directory as a finished run leaves it (config.yaml, export/teacher_backbone.*), random
    weights, no training: what tools/export.py reads of a run."""
    from dinoscale.checkpoint import save_backbone
    from dinoscale.config import load_config, save_config
    from dinoscale.models.factory import build_backbone
    from tests.hub.conftest import randomize_
    from tests.tiny import TINY_RUN

    run_dir = tmp_path_factory.mktemp("dinov3_run")
    cfg = load_config("quickstart", [*TINY_RUN, "model.arch=dinov3_vits16", f"train.output_dir={run_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    backbone = randomize_(build_backbone(cfg.model, drop_path_rate=0.0), seed=7)
    save_backbone(backbone.state_dict(), run_dir / "export" / "teacher_backbone")
    return run_dir


def dinov3_tokens(out: dict) -> torch.Tensor:
    """Our forward_features as the libraries' ``[cls, storage, patches]`` tokens."""
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], dim=1)


@pytest.mark.parametrize("to", ["timm", "hf", "official"])
def test_a_dinov3_run_exports(dinov3_run, tmp_path, capsys, to):
    from dinoscale.models.vit_dinov3 import DinoV3VisionTransformer

    run_backbone = load_backbone(weights=str(dinov3_run))
    assert isinstance(run_backbone, DinoV3VisionTransformer)
    out = tmp_path / to
    assert export_tool()([str(dinov3_run), "--to", to, "--output", str(out)]) == 0
    assert capsys.readouterr().err == ""  # no position embedding, so no note on resizing it
    if to == "official":  # the official DINOv3 layout: the run's weights, bitwise
        back = load_backbone(config=str(dinov3_run / "config.yaml"), weights=str(tmp_path / "official.safetensors"))
        expected = run_backbone.state_dict()
        assert back.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in back.state_dict().items())
        return
    x = images(2, 16, 24)
    with torch.no_grad():
        if to == "timm":
            assert json.loads((out / "config.json").read_text())["architecture"] == "vit_small_patch16_dinov3_qkvb"
            tokens = timm.create_model(f"local-dir:{out}", pretrained=True).eval().forward_features(x)
        else:
            tokens = transformers.DINOv3ViTModel.from_pretrained(out).eval()(pixel_values=x).last_hidden_state
        assert_close_tokens(tokens, dinov3_tokens(run_backbone.forward_features(x)), atol=1e-5)


def test_a_dinov3_hub_name_with_hugging_face_weights_to_timm(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from tests.hub.conftest import randomize_

    torch.manual_seed(0)
    hf = randomize_(DINOv3ViTModel(DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4, intermediate_size=128,
        layerscale_value=1e-5))).eval()
    hf.save_pretrained(tmp_path / "hf")
    sizes = ["--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2"]
    argv = ["dinov3_vits16", "--weights", str(tmp_path / "hf"), *sizes, "--to", "timm", "--output", str(tmp_path / "t")]
    assert export_tool()(argv) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    x = images(1, 32, 48)
    with torch.no_grad():
        assert_close_tokens(model.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5)
