"""tools/train_tokenizer.py end to end on Fashion-MNIST (a tiny dVAE, a few steps): it trains, saves a tokenizer
that loads, and the BEiT config's own command writes what the BEiT method then reads."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dinoscale.config import CONFIG_DIR, load_config
from dinoscale.methods.registry import build_method
from dinoscale.tokenizers.dvae import DiscreteVAE, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

TINY = ["--vocab-size", "16", "--hidden-dim", "8", "--codebook-dim", "8", "--batch-size", "16", "--steps", "40",
        "--warmup-steps", "5", "--kl-warmup-steps", "10", "--eval-images", "64", "--num-workers", "0",
        "--log-every", "20", "--lr", "0.01"]


def tool():
    spec = importlib.util.spec_from_file_location("tool_train_tokenizer", REPO / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trains_and_saves_a_tokenizer(tmp_path, capsys):
    module = tool()
    out = tmp_path / "tok"
    assert module.main([*TINY, "--output", str(out), "--patch-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert "step 40/40" in printed and "hard-token reconstruction" in printed
    info = json.loads((out / "dvae.json").read_text())
    assert info["args"]["patch_size"] == 7 and info["data"]["dataset"] == "fashion-mnist:train"
    assert info["training"]["steps"] == 40 and 1 <= info["final"]["tokens_used"] <= 16
    model = load_tokenizer(out)
    images = module.eval_images("fashion-mnist:train", 28, 7, 64)
    assert images.shape == (64, 3, 28, 28) and model.encoder.tokens(images).shape == (64, 16)
    # The recorded loss is the saved model's, and training did something: the same network at its initial weights
    # (the tool's seed) reconstructs worse.
    trained = module.evaluate(model, images, 32, "mse")
    assert trained["reconstruction_hard"] == pytest.approx(info["final"]["reconstruction_hard"], rel=1e-5)
    torch.manual_seed(0)
    untrained = module.evaluate(DiscreteVAE(**info["args"]), images, 32, "mse")
    assert trained["reconstruction_hard"] < 0.7 * untrained["reconstruction_hard"], (trained, untrained)
    # an existing tokenizer is not overwritten by accident
    with pytest.raises(SystemExit, match="--overwrite"):
        module.main([*TINY, "--output", str(out), "--patch-size", "7"])


def test_the_beit_config_command_writes_what_beit_reads(tmp_path):
    module = tool()
    config = CONFIG_DIR / "methods" / "beit_fmnist.yaml"
    args = module.parse_args(["--config", str(config)])
    cfg = load_config(config)
    assert (args.dataset, args.image_size, args.patch_size, args.output) == (cfg.train.dataset, 28, 4,
                                                                             cfg.beit.tokenizer)
    assert tuple(args.crop_scale) == tuple(cfg.beit.crop_scale)
    # without --config: the same Fashion-MNIST recipe
    plain = module.parse_args([])
    assert (plain.dataset, plain.image_size, plain.patch_size, plain.output) == (args.dataset, 28, 4, args.output)
    assert tuple(plain.crop_scale) == tuple(cfg.beit.crop_scale)
    out = tmp_path / "tok"
    assert module.main(["--config", str(config), *TINY, "--steps", "2", "--output", str(out)]) == 0
    method = build_method(load_config(config, [f"beit.tokenizer={out}"]))
    method.build_collate(cfg.model.patch_size)  # its grid is the ViT's 7x7
    assert method.tokenizer.vocab_size == 16
