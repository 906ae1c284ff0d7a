"""benchmarks/continued_pretraining.py's four runs are the configs they claim to be, and its table renders."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("continued_pretraining", BENCHMARKS / "continued_pretraining.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_variants_differ_only_in_head_init_and_warmup(bench, tmp_path):
    weights = tmp_path / "w.safetensors"
    configs = {name: bench.variant_config(name, weights, tmp_path, [], period=50) for name in bench.VARIANTS}
    assert {name: (c.continued.head_init, c.continued.backbone_warmup_steps) for name, c in configs.items()} == {
        "random heads": ("random", 0), "random heads + warm-up": ("random", 40),
        "k-means heads": ("kmeans", 0), "k-means heads + warm-up": ("kmeans", 40)}
    for name, cfg in configs.items():
        assert cfg.model.pretrained_weights == str(weights) and cfg.train.resume is False
        assert cfg.evaluation.period == 50 and cfg.evaluation.knn_max_train_samples == 5000
        assert Path(cfg.train.output_dir).parent == tmp_path
    final = bench.variant_config("random heads", weights, tmp_path, [])
    assert final.evaluation.knn_max_train_samples is None and final.evaluation.period == 0


def test_table_has_the_start_and_every_run(bench):
    run = dict(knn=76.0, train_s=120.0, head_init="kmeans", warmup_steps=40, during=[(50, 74.0), (100, 75.5)])
    results = dict(start="/runs/qs", steps=200, batch=128, base_lr=0.00025, warmup_steps=40, head_init_batches=8,
                   set=[], machine="test", cores=2, threads=2, load_before=1.0, load_after=2.0, commit="abc",
                   start_eval=dict(knn=75.0, knn_subset=73.0),
                   variants={"random heads": dict(run, head_init="random", warmup_steps=0, knn=70.0),
                             "k-means heads + warm-up": run})
    table = bench.markdown(results, "python benchmarks/continued_pretraining.py --start /runs/qs")
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert "steps 50, 100" in lines[0]
    assert lines[2] == "| start (no further training) | - | - | - | 73.00% | 75.00% |"
    assert lines[3] == "| random heads | random | 0 steps | 2.0 min | 74.0, 75.5 | **70.00%** |"
    assert lines[4].startswith("| k-means heads + warm-up | kmeans | 40 steps |")
