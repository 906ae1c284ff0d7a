"""benchmarks/dinov3_stages.py: its three stage commands are the runs its docstring describes (A without Gram
anchoring, B resuming A's checkpoint at the Gram teacher's copy step, C resuming B's with per-step crop sizes and
the same Gram teacher), and its report renders every table, a skipped backbone, and the lead's placeholder."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from dinoscale.config import load_config
from dinoscale.methods.gram import GramAnchor
from dinoscale.methods.registry import build_method
from dinoscale.methods.views import crop_resolutions
from dinoscale.train.build import planned_steps

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("dinov3_stages", BENCHMARKS / "dinov3_stages.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def stage_configs(commands):
    """The config of each ``python tools/train.py`` line and the (source, destination) of each ``cp -r`` line."""
    configs, copies = [], []
    for line in commands:
        words = shlex.split(line)
        if words[:2] == ["python", "tools/train.py"]:
            assert words[2] == "--config"
            configs.append(load_config(REPO / words[3], words[4:]))
        elif words[:2] == ["cp", "-r"]:
            copies.append((Path(words[2]), Path(words[3])))
    return configs, copies


def test_stage_commands_are_the_three_stages(bench, tmp_path):
    a_dir, b_dir, c_dir = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    (a, b, c), copies = stage_configs(bench.stage_commands(a_dir, b_dir, c_dir, gram_start=300, gram_end=400))
    assert [Path(x.train.output_dir) for x in (a, b, c)] == [a_dir, b_dir, c_dir]
    assert copies == [(a_dir / "checkpoints" / "step_000000300", b_dir / "checkpoints"),
                      (b_dir / "checkpoints" / "step_000000400", c_dir / "checkpoints")]
    # A: 400 steps without Gram anchoring; its step-300 checkpoint is written and still kept at the end
    assert not a.gram.enabled and planned_steps(a) == 400
    kept = list(range(a.train.checkpoint_every, 401, a.train.checkpoint_every))[-a.train.keep_checkpoints:]
    assert 300 in kept and 400 in kept
    # B: resumes the copied step-300 checkpoint, which needs no Gram teacher, and copies it at that very step
    anchor = GramAnchor(b)
    assert b.gram.enabled and planned_steps(b) == 400
    assert anchor.copies_at(300) and not anchor.holds_weights_after(300) and anchor.holds_weights_after(400)
    # C: resumes B's step-400 checkpoint (which holds the Gram teacher) and trains to 500 without a new copy
    anchor = GramAnchor(c)
    assert planned_steps(c) == 500 and anchor.holds_weights_after(400)
    assert not any(anchor.copies_at(s) for s in range(400, 500))
    assert dict(c.gram) == dict(b.gram)
    resolutions = crop_resolutions(c.crops)
    assert resolutions.global_sizes == (32, 48) and resolutions.gram_sizes == (48, 64)
    assert all(size % c.model.patch_size == 0 for size in (*resolutions.global_sizes, *resolutions.gram_sizes))
    method = build_method(c)
    method.build_transform()
    method.build_collate(c.model.patch_size)
    # the stages change nothing a resume must keep: networks, heads, global batch, optimizer, schedules' shape
    for section in ("model", "dino", "ibot", "teacher"):
        assert a[section] == b[section] == c[section], section
    for key in ("batch_size_per_rank", "official_epoch_length", "seed", "num_workers", "dataset"):
        assert a.train[key] == b.train[key] == c.train[key], key
    assert {k: v for k, v in a.optim.items() if k != "epochs"} == {k: v for k, v in c.optim.items() if k != "epochs"}


def test_report_has_every_table_and_the_placeholder(bench, tmp_path):
    args = bench.parse_args(["--report", str(tmp_path / "r.md"), "--pictures-dir", str(tmp_path / "pics")])
    probe = dict(miou=0.25, patch_accuracy=0.65, foreground_iou=0.97, background_iou=0.973,
                 miou_bootstrap=[0.24, 0.25, 0.26])
    better = dict(probe, miou=0.27, miou_bootstrap=[0.26, 0.27, 0.29])
    sim = dict(all=0.24, fg_fg=0.27, bg_bg=0.82, fg_bg=-0.12, cls_patch=0.1, cls_fg=0.3, cls_bg=-0.1)
    done = dict(knn={32: 76.4, 64: 70.1}, probe={64: probe, 32: probe}, patch_knn={64: probe, 32: probe},
                similarity={64: sim, 32: sim}, grid={64: [8, 8], 32: [4, 4]}, foreground_share={64: 0.5, 32: 0.5},
                logged_final_knn=76.44)
    entries = bench.backbones_to_evaluate(args)
    rows = [dict(entries[0], source="seed", **done), dict(entries[1], source="ckpt", **done),
            dict(entries[2], source="/runs/x/checkpoints/step_000000400 not found"),
            dict(entries[3], source="ckpt", **dict(done, probe={64: better, 32: better}, knn={32: 77.0, 64: 70.0},
                                                   logged_final_knn=76.5)),
            dict(entries[4], source="ckpt", **done)]
    results = dict(backbones=rows, machine="cpu", cores=2, threads=2, load_before=1.0, load_after=1.5, total_s=300,
                   commit="abc1234", logged_knn_sets="32 px, all 60,000 training images as memory, all 10,000 test "
                   "images", pca_figure=str(tmp_path / "pics" / "pca_64px.png"), pca_test_indices=[19, 2])
    text = bench.markdown(results, args, "python benchmarks/dinov3_stages.py")
    assert "`python benchmarks/dinov3_stages.py` at commit abc1234" in text
    assert "| random init | the network every run starts from | 76.40% | 70.10% | 76.44% |" in text
    assert "| A@400 | no Gram anchoring, 400 steps | not evaluated: /runs/x/checkpoints/step_000000400 not found |" \
        in text
    assert "## Patch probe at 64 px (8 x 8 patches)" in text and "## Patch probe at 32 px (4 x 4 patches)" in text
    assert "| A@300 | 25.0 ± 1.0 | 65.0 | 97.0 | 97.3 | 25.0 |" in text
    # the stage differences: A@400 is missing, so only C@500 - B@400 (paired spread: std of [-2, -2, -3] points)
    assert "A@400 - A@300" not in text and "B@400 - A@400" not in text
    assert ("| C@500 - B@400 | 100 high-resolution steps after the Gram stage | -2.0 ± 0.6 | -2.0 ± 0.6 | -0.60 | "
            "+0.10 | -0.06 |") in text
    assert "near 77% on 2,000 test images has a binomial standard error of 0.95 points" in text
    assert "| A@300 | 64 px | 0.240 | 0.270 | 0.820 | -0.120 | 0.300 | -0.100 |" in text
    assert "![PCA of the patch tokens](pics/pca_64px.png)" in text
    assert text.rstrip().endswith("## Reading\n\n_To be written from the numbers above._")
