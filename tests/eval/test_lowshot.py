"""Low-shot evaluation: class-balanced seeded subsets, the logistic regression on them, mean/std over draws, the CLI."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from dinoscale.eval.lowshot import cross_validate_C, labelled_subset, lowshot_probe, mean_std, setting_name

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _cache(n, num_classes=5, dim=16, noise=0.3, seed=0):
    """Features clustered around one well-separated centre per class (separable), as a linear-probe cache."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(n) % num_classes
    cls = centres[labels] + noise * torch.randn(n, dim, generator=g)
    return {"cls_blocks": cls[:, None], "patch_mean": torch.randn(n, dim, generator=g), "labels": labels}


def test_subset_is_class_balanced_and_seeded():
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[order]
    idx = labelled_subset(labels, shots=5, seed=7)
    assert torch.bincount(labels[idx]).tolist() == [5, 5, 5]
    assert idx.unique().numel() == idx.numel() == 15
    assert torch.equal(idx, labelled_subset(labels, shots=5, seed=7))  # same seed, same subset
    others = [labelled_subset(labels, shots=5, seed=s) for s in range(5)]
    assert len({tuple(o.tolist()) for o in others}) == 5  # different draws differ
    # Percent: that share of every class (at least one image), keeping the class balance of the train set.
    pct = labelled_subset(labels, percent=10, seed=0)
    assert torch.bincount(labels[pct]).tolist() == [5, 3, 2]
    assert torch.bincount(labels[labelled_subset(labels, percent=1, seed=0)]).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="exactly one"):
        labelled_subset(labels, shots=1, percent=1)


def test_separable_problem_is_solved_from_one_shot():
    train, test = _cache(500, seed=0), _cache(200, seed=1)
    res = lowshot_probe(train, test, shots=(1, 2), percents=(1,), draws=3)
    assert set(res["settings"]) == {"1-shot", "2-shot", "1%"}
    one = res["settings"]["1-shot"]
    assert [r["num_labelled"] for r in one["draws"]] == [5, 5, 5]
    assert len({r["seed"] for r in one["draws"]}) == 3
    assert one["mean_top1"] >= 99.0
    assert res["settings"]["1%"]["num_labelled"] == 5  # 1% of 100 images per class


def test_random_labels_stay_near_chance():
    train, test = _cache(500, seed=0), _cache(500, seed=1)
    test["labels"] = test["labels"][torch.randperm(500, generator=torch.Generator().manual_seed(3))]
    res = lowshot_probe(train, test, shots=(5,), percents=(), draws=2)
    assert res["settings"]["5-shot"]["mean_top1"] < 35.0  # chance is 20%


def test_mean_and_std_over_draws():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((statistics.mean([1, 2, 4]), statistics.stdev([1, 2, 4])))
    assert mean_std([3.0]) == (3.0, 0.0)
    # A hard problem, so that the draws disagree; the reported figures are those of the per-draw rows.
    train, test = _cache(400, noise=4.0, seed=0), _cache(300, noise=4.0, seed=1)
    row = lowshot_probe(train, test, shots=(1,), percents=(), draws=4)["settings"]["1-shot"]
    accs = [r["test_top1"] for r in row["draws"]]
    assert len(set(accs)) > 1
    assert row["mean_top1"] == pytest.approx(statistics.mean(accs))
    assert row["std_top1"] == pytest.approx(statistics.stdev(accs))
    assert setting_name(percent=1.0) == "1%" and setting_name(shots=13) == "13-shot"


def test_C_is_chosen_on_the_labelled_subset_only():
    train, test = _cache(300, noise=2.0, seed=0), _cache(100, noise=2.0, seed=1)
    Cs = (1e-3, 1.0, 100.0)
    res = lowshot_probe(train, test, shots=(1, 4), percents=(), draws=2, Cs=Cs, default_C=0.5)
    # One image of a class: no fold can hold it out, so the default C is used.
    assert {r["C"] for r in res["settings"]["1-shot"]["draws"]} == {0.5}
    four = res["settings"]["4-shot"]["draws"]
    assert all(r["C_from"] == "cross-validation" and r["C"] in Cs for r in four)
    # The test set plays no part in the choice: other test features, the same C.
    scrambled = {**test, "cls_blocks": torch.randn_like(test["cls_blocks"])}
    again = lowshot_probe(train, scrambled, shots=(4,), percents=(), draws=2, Cs=Cs, default_C=0.5)
    assert [r["C"] for r in again["settings"]["4-shot"]["draws"]] == [r["C"] for r in four]
    # The cross-validation itself: stratified folds, one row per C.
    x = torch.nn.functional.normalize(train["cls_blocks"][:, 0], dim=1).numpy()
    rows = cross_validate_C(x[:40], train["labels"][:40].numpy(), Cs, folds=4)
    assert [r["C"] for r in rows] == list(Cs) and all(0 <= r["cv_top1"] <= 100 for r in rows)
    assert cross_validate_C(x[:5], train["labels"][:5].numpy(), Cs) is None


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST IDX files not installed")
def test_cli_runs_end_to_end_on_fashion_mnist(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tool_eval_lowshot", REPO / "tools" / "eval_lowshot.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "lowshot.json"
    argv = ["--arch", "vit_small", "--model-arg", "embed_dim=32", "--model-arg", "depth=1", "--model-arg",
            "num_heads=2", "--model-arg", "patch_size=7", "--model-arg", "img_size=28",
            "--train", "fashion-mnist:train", "--test", "fashion-mnist:test", "--max-train", "300",
            "--max-test", "100", "--image-size", "28",
            "--crop-ratio", "1.0", "--shots", "1", "5", "--percent", "10", "--draws", "2", "--batch-size", "100",
            "--autocast", "fp32", "--device", "cpu", "--no-progress", "--output", str(out)]
    torch.manual_seed(0)
    assert tool.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["num_train"] == 300 and report["num_test"] == 100 and report["draws"] == 2
    assert set(report["settings"]) == {"1-shot", "5-shot", "10%"}
    assert report["settings"]["5-shot"]["num_labelled"] == 50
    for row in report["settings"].values():
        assert len(row["draws"]) == 2 and 0 <= row["mean_top1"] <= 100
    # A random ViT's features still separate Fashion-MNIST well above chance (10%) from 5 images per class.
    assert report["settings"]["5-shot"]["mean_top1"] > 25.0
    assert "5-shot" in capsys.readouterr().out
