"""A real (tiny) training run, made once per session, that the report tests read or copy and damage."""

import shutil
from pathlib import Path

import pytest

from dinoscale.config import load_config
from dinoscale.train import loop
from tests.tiny import TINY_NETWORK

FMNIST = Path("/usr/share/datasets/fashion-mnist")

# The quickstart recipe shrunk to seconds: 4 steps of 8 images, kNN at steps 2 and 4 on a few hundred images.
TINY_RUN = [
    *TINY_NETWORK,
    "train.batch_size_per_rank=8", "train.num_workers=0", "train.log_every=1", "train.tensorboard=false",
    "train.dataset=fashion-mnist:train", "train.build_shards_from=null", "train.autocast=none",
    "train.official_epoch_length=2", "optim.epochs=2", "train.checkpoint_every=2",
    "evaluation.period=2", "evaluation.knn_image_size=16", "evaluation.knn_max_train_samples=200",
    "evaluation.knn_max_test_samples=50",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 4-step run directory (config, metrics with eval and final_knn rows, checkpoints, export)."""
    if not FMNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("tiny_run")
    result = loop.train(load_config("quickstart", TINY_RUN + [f"train.output_dir={out}"]))
    assert result.status == "finished" and result.step == 4
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run that a test may damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))
