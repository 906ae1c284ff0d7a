"""benchmarks/fmnist.py's recipes are valid configs, and the report's commands reproduce them."""

import importlib.util
import sys
from pathlib import Path

import pytest

from dinoscale.methods.registry import build_method

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def fmnist():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("fmnist_benchmark", BENCHMARKS / "fmnist.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("name", ["quickstart", "long"])
def test_recipe_configs_validate_and_build(fmnist, name, tmp_path):
    cfg = fmnist.recipe_config(name, tmp_path, [])
    assert cfg.train.output_dir == str(tmp_path / name) and cfg.train.resume is False
    built = build_method(cfg)
    built.build_transform()
    built.build_collate(cfg.model.patch_size)  # crop sizes must be multiples of the patch
    if name == "long":
        assert cfg.optim.epochs * cfg.train.official_epoch_length == 8000
        assert cfg.crops.local_crops_size == 21 and list(cfg.crops.local_crops_scale) == [0.15, 0.5]
        assert cfg.teacher.teacher_temp == 0.04


def test_report_gives_each_recipe_a_runnable_command(fmnist, tmp_path):
    entry = dict(knn=80.0, linear={"test_top1": 81.0, "setting": "last 4 CLS"}, steps=1, train_s=60.0,
                 timed="measured", eval_s=30.0, random_init={"knn": 60.0, "linear": {"test_top1": 61.0,
                                                                                    "setting": "last 1 CLS"}})
    results = {"recipes": {name: dict(entry, description=desc, overrides=over)
                           for name, (over, desc) in fmnist.RECIPES.items()},
               "pixels_knn": 83.94, "batch": 128, "autocast": "bf16", "machine": "test", "threads": 2}
    args = fmnist.argparse.Namespace(set=[])
    report = tmp_path / "fmnist.md"
    fmnist.write_report(results, args, report)
    text = report.read_text()
    assert "not met (best 80.00% against 83.94%)" in text
    long_command = next(line for line in text.splitlines() if line.startswith("- **long**"))
    # a quoted list override (the shell would glob the brackets) and its own output directory, so it does
    # not resume a finished quickstart run from ./outputs/quickstart
    assert "'crops.local_crops_scale=[0.15,0.5]'" in long_command
    assert "train.output_dir=./outputs/fmnist_long" in long_command
