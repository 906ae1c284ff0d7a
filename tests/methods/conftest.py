"""Tiny end-to-end runs of each method through ``dinoscale.train.loop.train`` (CPU, seconds each)."""

import json
from pathlib import Path

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.train import loop
from tests.tiny import TINY_RUN

FMNIST = Path("/usr/share/datasets/fashion-mnist")

# The tiny ViT of tests/train/test_loop.py, plus small heads for every method.
TINY = [
    *TINY_RUN,
    "model.drop_path_rate=0.1", "model.layerscale=1.0e-5",  # pinned: quickstart.yaml's model may change
    "optim.base_lr=0.001",
    "simclr.proj_hidden_dim=64", "simclr.proj_out_dim=32",
    "barlow_twins.proj_dims=[64,64]",
    "simmim.mask_patch_size=8",
    "msn.proj_hidden_dim=64", "msn.proj_out_dim=32", "msn.num_prototypes=64",
    # PIRL: a bank as large as Fashion-MNIST's train set (the tiny runs draw any of its indices), 8 px tiles.
    "pirl.embed_dim=16", "pirl.bank_size=60000", "pirl.num_negatives=64", "pirl.jigsaw_size=24", "pirl.tile_size=8",
    # BEiT on the 4x4 patch grid: ~40% masked in blocks of at least 2 (its tokenizer: the tiny_tokenizer fixture).
    "beit.num_masking_patches=6", "beit.min_block_patches=2", "beit.crop_scale=[0.4,1.0]",
]


def short_run(steps: int) -> list[str]:
    """``steps`` optimizer steps at a fixed learning rate, no warmup, no intermediate checkpoint."""
    return [f"train.max_steps={steps}", f"optim.epochs={steps}", "optim.base_lr=0.002", "optim.min_lr=0.002",
            "optim.warmup_epochs=0", "train.checkpoint_every=1000"]


# An EMA teacher held fixed (momentum 1, constant temperature, frozen center): its targets are then a fixed
# function of the images, so the student's loss to them must go down. (A moving teacher may raise it.) The
# student starts as a copy of the teacher, so soft targets leave little to learn: the temperature is low.
FIXED_TEACHER = ["teacher.momentum_teacher=1.0", "teacher.final_momentum_teacher=1.0",
                 "teacher.teacher_temp=0.04", "teacher.warmup_teacher_temp=0.04", "dino.center_momentum=1.0"]


class MethodRunner:
    """Runs a method on the tiny config in ``tmp_path`` and reads its metrics (the ``runner`` fixture)."""

    FIXED_TEACHER = FIXED_TEACHER

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    def config(self, method, *extra, out=None):
        out = out or self.tmp_path
        return load_config("quickstart", TINY + [f"method={method}", f"train.output_dir={out}", *extra])

    def train(self, method, *extra, out=None):
        """``(cfg, TrainResult)`` of a run of ``method`` with the overrides ``extra``."""
        cfg = self.config(method, *extra, out=out)
        return cfg, loop.train(cfg)

    def rows(self, out=None):
        """The per-step metric rows of a run."""
        path = Path(out or self.tmp_path) / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        return [r for r in lines if "type" not in r]

    def assert_training_lowers_loss(self, method, *extra, steps=20, factor=0.9):
        """Train ``method`` for ``steps`` steps, and again with a learning rate of 0 (same seed, so the same
        batches, augmentations, masks and drop-path draws), and compare the losses on the same batches.

        Pairing the steps removes the batch-to-batch noise that makes "the loss went down" unreliable with
        small batches: over the second half of the steps the trained network's mean loss must be below the
        untouched one's by ``1 - factor`` of its magnitude. Returns ``(trained rows, untouched rows)``.
        """
        trained, untouched = self.tmp_path / "trained", self.tmp_path / "untouched"
        self.train(method, *short_run(steps), *extra, out=trained)
        self.train(method, *short_run(steps), *extra, "optim.base_lr=0.0", "optim.min_lr=0.0", out=untouched)
        a, b = self.rows(trained), self.rows(untouched)
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
        assert a[0]["loss"] == b[0]["loss"]  # same batch, same initial weights
        late_a = sum(r["loss"] for r in a[steps // 2 :]) / (steps - steps // 2)
        late_b = sum(r["loss"] for r in b[steps // 2 :]) / (steps - steps // 2)
        assert late_a < late_b - (1 - factor) * abs(late_b), ([r["loss"] for r in a], [r["loss"] for r in b])
        return a, b


@pytest.fixture
def tiny_config():
    """``tiny_config(method, *overrides)``: the tiny config of ``method`` (no data set needed to build it)."""
    return lambda method, *extra: load_config("quickstart", TINY + [f"method={method}", *extra])


@pytest.fixture(scope="session")
def tiny_teacher_run(tmp_path_factory):
    """A dinoscale run directory of a tiny DINOv2 network (the tiny config, random weights): ``config.yaml`` and
    ``export/teacher_backbone.*`` + ``teacher_heads.*``, as a finished run leaves them; no data set needed."""
    from dinoscale.config import save_config
    from dinoscale.methods.dinov2 import DINOv2
    from dinoscale.train.evaluate import export_network

    run_dir = tmp_path_factory.mktemp("teacher_run")
    cfg = load_config("quickstart", TINY + ["method=dinov2", f"train.output_dir={run_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(123)  # not the students' seed: the teacher is another network
    _, teacher = DINOv2(cfg).build_networks()
    export_network(teacher, run_dir / "export", "teacher")
    return run_dir


def save_tiny_tokenizer(directory, patch_size: int = 4, seed: int = 7):
    """A random-weight dVAE tokenizer (``patch_size`` cells, 32 tokens, 8 channels) in ``directory``, as
    tools/train_tokenizer.py writes one; returns the directory."""
    from dinoscale.tokenizers.dvae import DiscreteVAE, save_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiscreteVAE(patch_size=patch_size, vocab_size=32, hidden_dim=8, codebook_dim=8, num_res_blocks=1)
    return save_tokenizer(model, directory)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny config's BEiT tokenizer: a dVAE directory with 4-px cells (the tiny ViT's patches), random weights."""
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def runner(tmp_path):
    if not FMNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    return MethodRunner(tmp_path)

