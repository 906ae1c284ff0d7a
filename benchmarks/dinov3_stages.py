"""What DINOv3's Gram anchoring stage and high-resolution stage do to a tiny DINOv3 ViT on Fashion-MNIST (issue #17).

Three runs of ``configs/dinov3_fmnist.yaml`` (embed 192, depth 4, 8 px patches, 32 px crops: a 4 x 4 grid),
run from the repository root (``--print-stage-commands`` prints these for other run directories)::

    # A: 400 steps without Gram anchoring, a checkpoint every 100 steps (200, 300 and 400 are kept)
    python tools/train.py --config configs/dinov3_fmnist.yaml gram.enabled=false train.checkpoint_every=100 \\
        train.output_dir=/work/runs/v3_nogram
    # B: the Gram stage: A's step-300 checkpoint in a new run directory, trained 300 -> 400 with the config's Gram
    #    anchoring (the Gram teacher is the EMA teacher at the start of step 300, refreshed once, at step 350)
    mkdir -p /work/runs/v3_gram/checkpoints
    cp -r /work/runs/v3_nogram/checkpoints/step_000000300 /work/runs/v3_gram/checkpoints/
    python tools/train.py --config configs/dinov3_fmnist.yaml gram.enabled=true gram.it_load_ema_teacher=300 \\
        train.checkpoint_every=100 train.output_dir=/work/runs/v3_gram
    # C: the high-resolution stage: B's step-400 checkpoint in a new run directory, trained 400 -> 500; each step
    #    draws (global, local, Gram-teacher) crop sizes (32, 16, 48) or (48, 24, 64) px with probability 1/2; Gram
    #    anchoring goes on against B's Gram teacher (no step of C copies it again)
    mkdir -p /work/runs/v3_highres/checkpoints
    cp -r /work/runs/v3_gram/checkpoints/step_000000400 /work/runs/v3_highres/checkpoints/
    python tools/train.py --config configs/dinov3_fmnist.yaml gram.enabled=true gram.it_load_ema_teacher=300 \\
        optim.epochs=5 train.checkpoint_every=100 crops.multi_resolution.enabled=true \\
        'crops.multi_resolution.global_crops_sizes=[32,48]' 'crops.multi_resolution.local_crops_sizes=[16,24]' \\
        'crops.multi_resolution.gram_crops_sizes=[48,64]' 'crops.multi_resolution.weights=[0.5,0.5]' \\
        train.output_dir=/work/runs/v3_highres

A run resumes the newest checkpoint of its own ``train.output_dir``, so a stage starts from the copied one: its
data position, optimizer, loss state and RNG streams continue A's (B's batches 300-399 are A's), and a checkpoint
written before ``gram.it_load_ema_teacher`` needs no Gram teacher. A@400 and B@400 therefore share A's first 300
steps and differ only in the last 100 (without / with Gram anchoring); C@500 adds 100 high-resolution steps.

Evaluated: the EMA teacher's backbone of A@300 (where both stages start), A@400, B@400 and C@500 (read from the
checkpoints), and the random init every run starts from (same config and seed):

* kNN@20 of the CLS token as the runs evaluate it (``dinoscale.train.evaluate.evaluate_knn``: weighted cosine,
  T=0.07, the evaluation transform) at 32 and 64 px, with the first ``--knn-train-samples`` training images as
  memory on the first ``--knn-test-samples`` test images (0: all; the runs' own final kNN, with all 60,000 / 10,000
  at 32 px, is listed beside it from their ``metrics.jsonl``);
* the patch probe of ``dinoscale.eval.patch_probe`` at 64 and 32 px (see its docstring: an 11-way label per patch,
  the logistic regression of ``dinoscale.eval.linear`` on the final-norm patch tokens of ``--probe-train``
  training images, scored on ``--probe-test`` test images: mIoU, patch accuracy, foreground/background IoU; and
  the patch kNN with a smaller memory);
* within-image cosine similarities of the patch tokens (all pairs, foreground/background pairs, CLS to patches) on
  the probe's test images: what Gram anchoring is meant to keep from collapsing;
* PCA pictures: the first three principal components of the patch tokens at 64 px as RGB (one PCA per backbone,
  fitted over the six pictured images), one column per backbone, in ``--pictures-dir``.

Writes ``--report`` (markdown: command, commit, machine, tables) and ``results.json`` in ``--pictures-dir``::

    python benchmarks/dinov3_stages.py                                   # the run directories above
    python benchmarks/dinov3_stages.py --nogram R/a --gram R/b --highres R/c --knn-train-samples 0
    python benchmarks/dinov3_stages.py --print-stage-commands --nogram R/a --gram R/b --highres R/c
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale.checkpoint import latest_checkpoint  # noqa: E402
from dinoscale.config import CONFIG_DIR, load_config  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval import patch_probe as pp  # noqa: E402
from dinoscale.eval.backbones import load_backbone  # noqa: E402
from dinoscale.eval.transforms import eval_transform  # noqa: E402
from dinoscale.hub import load_state_dict_any  # noqa: E402
from dinoscale.train.evaluate import evaluate_knn  # noqa: E402
from dinoscale.viz.pca import patch_features, pca_rgb  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from fmnist import current_commit  # noqa: E402
from fmnist_methods import machine_description, random_init_backbone  # noqa: E402

CONFIG = "configs/dinov3_fmnist.yaml"
BOOTSTRAP = 200  # resamples of the probe's test images for the spread of its mIoU
HIGHRES = ["optim.epochs=5", "train.checkpoint_every=100", "crops.multi_resolution.enabled=true",
           "crops.multi_resolution.global_crops_sizes=[32,48]", "crops.multi_resolution.local_crops_sizes=[16,24]",
           "crops.multi_resolution.gram_crops_sizes=[48,64]", "crops.multi_resolution.weights=[0.5,0.5]"]


def step_dir(step: int) -> str:
    return f"step_{step:09d}"


def stage_overrides(gram_start: int) -> dict[str, list[str]]:
    """The config overrides of the three runs (on ``configs/dinov3_fmnist.yaml``), without ``train.output_dir``."""
    gram = ["gram.enabled=true", f"gram.it_load_ema_teacher={gram_start}"]
    return {"A": ["gram.enabled=false", "train.checkpoint_every=100"],
            "B": [*gram, "train.checkpoint_every=100"],
            "C": [*gram, *HIGHRES]}


def stage_commands(nogram: Path, gram: Path, highres: Path, *, gram_start: int = 300, gram_end: int = 400) -> list[str]:
    """The shell commands of the three runs (A, then B from A's ``gram_start`` checkpoint, then C from B's
    ``gram_end`` one), run from the repository root."""
    overrides = stage_overrides(gram_start)

    def train(stage: str, out: Path) -> str:
        return shlex.join(["python", "tools/train.py", "--config", CONFIG, *overrides[stage],
                           f"train.output_dir={out}"])

    def copy(src: Path, step: int, dst: Path) -> list[str]:
        return [shlex.join(["mkdir", "-p", str(dst / "checkpoints")]),
                shlex.join(["cp", "-r", str(src / "checkpoints" / step_dir(step)), str(dst / "checkpoints") + "/"])]

    return [train("A", nogram), *copy(nogram, gram_start, gram), train("B", gram),
            *copy(gram, gram_end, highres), train("C", highres)]


def backbones_to_evaluate(args) -> list[dict]:
    """(name, what it is, run directory, step) of each backbone; step None: the random init."""
    return [
        dict(name="random init", what="the network every run starts from", run=args.nogram, step=None),
        dict(name=f"A@{args.gram_start}", what="no Gram anchoring; where both stages start", run=args.nogram,
             step=args.gram_start),
        dict(name=f"A@{args.gram_end}", what=f"no Gram anchoring, {args.gram_end} steps", run=args.nogram,
             step=args.gram_end),
        dict(name=f"B@{args.gram_end}", what=f"A@{args.gram_start} + {args.gram_end - args.gram_start} steps with "
             "Gram anchoring", run=args.gram, step=args.gram_end),
        dict(name=f"C@{args.highres_end}", what=f"B@{args.gram_end} + {args.highres_end - args.gram_end} "
             "high-resolution steps", run=args.highres, step=args.highres_end),
    ]


def run_config_path(args) -> Path:
    """The config of the random init: the first run's ``config.yaml`` there is, else the recipe."""
    for run in (args.nogram, args.gram, args.highres):
        if (run / "config.yaml").is_file():
            return run / "config.yaml"
    return CONFIG_DIR / "dinov3_fmnist.yaml"


def load_evaluated(entry: dict, config: Path) -> tuple[torch.nn.Module | None, str]:
    """The backbone of ``entry`` and where it came from; None and the reason when its checkpoint is missing.
    A checkpoint that is its run's newest is checked against the run's export (the same EMA teacher)."""
    if entry["step"] is None:
        return random_init_backbone(load_config(config)).eval().requires_grad_(False), f"seed of {config}"
    run, ckpt = entry["run"], entry["run"] / "checkpoints" / step_dir(entry["step"])
    if not (run / "config.yaml").is_file() or not (ckpt / "trainer.json").is_file():
        return None, f"{ckpt} not found"
    model = load_backbone(config=str(run / "config.yaml"), weights=str(ckpt))
    export = run / "export" / "teacher_backbone.safetensors"
    newest = latest_checkpoint(run)
    if export.is_file() and newest is not None and newest.name == ckpt.name:
        exported = load_backbone(config=str(run / "config.yaml"))
        load_state_dict_any(exported, str(export))
        mine, theirs = model.state_dict(), exported.state_dict()
        if any(not torch.equal(mine[k], theirs[k]) for k in mine):
            raise SystemExit(f"{ckpt}: the EMA teacher read from the checkpoint differs from {export}")
    return model, str(ckpt)


def logged_final_knn(run: Path, step: int) -> dict:
    """The run's own ``final_knn`` row at ``step`` (``teacher``, ``random_init``), if it logged one."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    found = [r for r in rows if r.get("type") == "final_knn" and r.get("step") == step]
    return found[-1] if found else {}


def knn_config(config: Path, size: int, args):
    cap = lambda n: "null" if not n else n  # noqa: E731
    return load_config(config, [f"evaluation.knn_image_size={size}",
                                f"evaluation.knn_max_train_samples={cap(args.knn_train_samples)}",
                                f"evaluation.knn_max_test_samples={cap(args.knn_test_samples)}"])


def evaluate_backbone(model: torch.nn.Module, config: Path, args, device: torch.device) -> dict:
    cfg = load_config(config)
    out: dict = {"knn": {}, "probe": {}, "patch_knn": {}, "similarity": {}, "grid": {}, "foreground_share": {},
                 "seconds": {}}
    for size in args.knn_sizes:
        t = time.time()
        kcfg = knn_config(config, size, args)
        out["knn"][size] = evaluate_knn(kcfg, model, device)[f"knn/top1@{kcfg.evaluation.knn_k}"]
        out["seconds"][f"knn {size} px"] = round(time.time() - t, 1)
    extract = dict(batch_size=256, num_workers=min(cfg.train.num_workers, 4), device=device)
    train_set = open_dataset(cfg.evaluation.knn_train_dataset, max_samples=args.probe_train)
    test_set = open_dataset(cfg.evaluation.knn_test_dataset, max_samples=args.probe_test)
    for size in args.probe_sizes:
        t = time.time()
        train = pp.extract_patch_data(model, train_set, image_size=size, threshold=args.threshold, **extract)
        test = pp.extract_patch_data(model, test_set, image_size=size, threshold=args.threshold, **extract)
        out["seconds"][f"patch tokens {size} px"] = round(time.time() - t, 1)
        t = time.time()
        out["probe"][size] = pp.fit_patch_probe(train["patches"], train["labels"], test["patches"], test["labels"],
                                                Cs=args.probe_cs, bootstrap=BOOTSTRAP)
        out["seconds"][f"probe {size} px"] = round(time.time() - t, 1)
        if args.patch_knn_train and args.patch_knn_test:
            t = time.time()
            n, m = args.patch_knn_train, args.patch_knn_test
            out["patch_knn"][size] = pp.patch_knn(train["patches"][:n], train["labels"][:n], test["patches"][:m],
                                                  test["labels"][:m])
            out["seconds"][f"patch kNN {size} px"] = round(time.time() - t, 1)
        out["similarity"][size] = pp.patch_similarity_stats(test["patches"], test["labels"], cls=test["cls"])
        out["grid"][size] = list(test["grid"])
        out["foreground_share"][size] = float((test["labels"] > 0).float().mean())
    return out


def pca_images(config: Path, args, patch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The first test image of each of ``--pca-classes``: normalised inputs at ``--pca-size`` (crop ratio 1),
    their gray pictures, their indices in the test set."""
    cfg = load_config(config)
    test_set = open_dataset(cfg.evaluation.knn_test_dataset)
    transform = eval_transform(args.pca_size, patch_size, crop_ratio=1.0)
    inputs, pictures, indices = [], [], []
    for c in args.pca_classes:
        i = next(i for i in range(len(test_set)) if test_set[i][1] == c)
        x = transform(test_set[i][0])
        inputs.append(x)
        pictures.append(pp.intensity(x[None])[0])
        indices.append(i)
    return inputs, pictures, indices


def save_pca_figure(pictures: list[torch.Tensor], columns: dict[str, list[torch.Tensor]], path: Path,
                    class_names: list[str]) -> None:
    """Rows: images; columns: the input, then each backbone's PCA picture."""
    n_rows, n_cols = len(pictures), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, 1.7 * n_rows), squeeze=False)
    for r, picture in enumerate(pictures):
        axes[r, 0].imshow(picture.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(class_names[r], fontsize=8)
        for c, (name, rgbs) in enumerate(columns.items(), start=1):
            axes[r, c].imshow(rgbs[r].numpy(), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> dict:
    device = resolve_device(args.device)
    config = run_config_path(args)
    ev = load_config(config).evaluation
    results = {"logged_knn_sets": f"{ev.knn_image_size} px, {cap(ev.knn_max_train_samples, 60000)} training images "
                                  f"as memory, {cap(ev.knn_max_test_samples, 10000)} test images"}
    results |= {"config": str(config), "machine": machine_description(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "backbones": []}
    start = time.time()
    pca_columns, pictures = {}, None
    for entry in backbones_to_evaluate(args):
        model, source = load_evaluated(entry, config)
        row = {k: (str(v) if isinstance(v, Path) else v) for k, v in entry.items()}
        row["source"] = source
        if model is None:
            print(f"== {entry['name']}: skipped ({source})", flush=True)
            results["backbones"].append(row)
            continue
        t = time.time()
        model = model.to(device)
        row.update(evaluate_backbone(model, config, args, device))
        if entry["step"] is None:  # the random init every run evaluates at its end: A's
            row["logged_final_knn"] = logged_final_knn(args.nogram, args.gram_end).get("random_init")
        else:
            row["logged_final_knn"] = logged_final_knn(entry["run"], entry["step"]).get("teacher")
        if pictures is None:
            inputs, pictures, results["pca_test_indices"] = pca_images(config, args, model.patch_size)
        pca_columns[entry["name"]] = pca_rgb(patch_features(model, inputs))
        row["eval_s"] = round(time.time() - t, 1)
        results["backbones"].append(row)
        print(f"== {entry['name']} ({row['eval_s']:.0f} s): " + ", ".join(
            f"kNN {s} px {v:.2f}%" for s, v in row["knn"].items()) + ", " + ", ".join(
            f"probe mIoU {s} px {100 * p['miou']:.1f}" for s, p in row["probe"].items())
            + "; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in row["seconds"].items()), flush=True)
    if pca_columns:
        from dinoscale.data.sources.fashion_mnist import FASHION_MNIST_CLASSES

        path = args.pictures_dir / f"pca_{args.pca_size}px.png"
        save_pca_figure(pictures, pca_columns, path, [FASHION_MNIST_CLASSES[c] for c in args.pca_classes])
        results["pca_figure"] = str(path)
    results.update(total_s=round(time.time() - start, 1), load_after=os.getloadavg()[0], commit=current_commit())
    return results


def binomial_note(rows: list[dict], args) -> str:
    """The binomial standard error of one kNN accuracy like the trained ones, on the table's and the runs' sets."""
    trained = [b["knn"][args.knn_sizes[0]] / 100 for b in rows if b["step"] is not None]
    acc = sum(trained) / len(trained) if trained else 0.7
    n = args.knn_test_samples or 10000
    se = lambda m: 100 * math.sqrt(acc * (1 - acc) / m)  # noqa: E731
    return (f"one accuracy near {100 * acc:.0f}% on {n:,} test images has a binomial standard error of "
            f"{se(n):.2f} points, on the runs' 10,000 {se(10000):.2f}")


def seconds_by_part(rows: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in rows:
        for part, seconds in b.get("seconds", {}).items():
            total[part] = total.get(part, 0.0) + seconds
    return total


def cap(n: int | None, total: int) -> str:
    return f"the first {n:,}" if n else f"all {total:,}"


def _std(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).std())


def stage_differences(rows: list[dict], args) -> list[tuple[str, dict, dict]]:
    """(label, later, earlier) of the comparisons the stages make, among the evaluated backbones."""
    by_name = {b["name"]: b for b in rows if "knn" in b}
    pairs = [(f"A@{args.gram_end} - A@{args.gram_start}", f"A@{args.gram_end}", f"A@{args.gram_start}",
              f"{args.gram_end - args.gram_start} more steps without Gram anchoring"),
             (f"B@{args.gram_end} - A@{args.gram_end}", f"B@{args.gram_end}", f"A@{args.gram_end}",
              "the same steps with Gram anchoring instead of without: the Gram stage's effect"),
             (f"C@{args.highres_end} - B@{args.gram_end}", f"C@{args.highres_end}", f"B@{args.gram_end}",
              f"{args.highres_end - args.gram_end} high-resolution steps after the Gram stage")]
    return [(label, what, by_name[a], by_name[b]) for label, a, b, what in pairs if a in by_name and b in by_name]


def _pct(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(results: dict, args, command: str) -> str:
    rows = [b for b in results["backbones"]]
    done = [b for b in rows if "knn" in b]
    lines = [
        "# DINOv3 stages on Fashion-MNIST: Gram anchoring and high resolution",
        "",
        f"Generated by `{command}`" + (f" at commit {results['commit']}" if results.get("commit") else "") + ".",
        "",
        "Runs of `configs/dinov3_fmnist.yaml` (a DINOv3 ViT: embed 192, depth 4, 8 px patches, 32 px global crops): "
        f"A (`{args.nogram}`) trains {args.gram_end} steps without Gram anchoring; B (`{args.gram}`) resumes A's "
        f"step-{args.gram_start} checkpoint and trains to {args.gram_end} with Gram anchoring; C (`{args.highres}`) "
        f"resumes B's step-{args.gram_end} checkpoint and trains to {args.highres_end} with per-step crop sizes "
        "(global/local/Gram teacher 32/16/48 or 48/24/64 px). The commands are in the script's docstring "
        "(`--print-stage-commands`). Every backbone is the EMA teacher's, read from the checkpoint; the random init "
        "is the network the runs start from.",
        "",
        f"Machine: {results['machine']}, {results['cores']} cores, {results['threads']} torch threads, no GPU; "
        f"1-minute load average {results['load_before']:.1f} before and {results['load_after']:.1f} after; "
        f"{results['total_s'] / 60:.1f} min in all"
        + (" (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds_by_part(done).items()) + ", summed over the "
           "backbones)" if done else "") + ".",
        "",
        "## kNN@20 of the CLS token",
        "",
        f"Weighted cosine kNN (k=20, T=0.07) as the runs evaluate: {cap(args.knn_train_samples, 60000)} training "
        f"images as memory, {cap(args.knn_test_samples, 10000)} test images, the evaluation transform at each size. "
        f"The last column is the run's own final kNN from its `metrics.jsonl` ({results['logged_knn_sets']}).",
        "",
        "| backbone | what | " + " | ".join(f"kNN@20 {s} px" for s in args.knn_sizes)
        + " | run's final kNN@20 |",
        "| --- | --- |" + " ---: |" * (len(args.knn_sizes) + 1),
    ]
    for b in rows:
        if "knn" not in b:
            lines.append(f"| {b['name']} | {b['what']} |" + " not evaluated: " + b["source"] + " |"
                         + " |" * len(args.knn_sizes))
            continue
        lines.append(f"| {b['name']} | {b['what']} | " + " | ".join(f"{_pct(b['knn'][s])}%" for s in args.knn_sizes)
                     + f" | {_pct(b.get('logged_final_knn'))}{'%' if b.get('logged_final_knn') is not None else ''} |")
    for size in args.probe_sizes:
        grid = done[0]["grid"][size] if done else ["?", "?"]
        share = done[0]["foreground_share"][size] if done else float("nan")
        lines += [
            "",
            f"## Patch probe at {size} px ({grid[0]} x {grid[1]} patches)",
            "",
            f"`dinoscale.eval.patch_probe`: 11 labels per patch (background, or the image's class where at least half "
            f"the patch's pixels are above {args.threshold:g}; {100 * share:.0f}% of the test patches are foreground). "
            f"Logistic regression (C={', '.join(f'{c:g}' for c in args.probe_cs)}) on the final-norm patch tokens of "
            f"the first {args.probe_train:,} training images, scored on the first {args.probe_test:,} test images "
            f"(scores in %; ± the standard deviation of the mIoU over {BOOTSTRAP} resamples of the test images)"
            + (f"; patch kNN (k=20): the patches of the first {args.patch_knn_train:,} training images as memory, "
               f"those of the first {args.patch_knn_test:,} test images as queries" if args.patch_knn_train else "")
            + ".",
            "",
            "| backbone | mIoU | patch accuracy | foreground IoU | background IoU |"
            + (" patch kNN mIoU |" if args.patch_knn_train else ""),
            "| --- |" + " ---: |" * (4 + bool(args.patch_knn_train)),
        ]
        for b in done:
            p = b["probe"][size]
            knn = f" {_pct(100 * b['patch_knn'][size]['miou'], 1)} |" if size in b.get("patch_knn", {}) else ""
            spread = f" ± {100 * _std(p['miou_bootstrap']):.1f}" if p.get("miou_bootstrap") else ""
            lines.append(f"| {b['name']} | {_pct(100 * p['miou'], 1)}{spread} | {_pct(100 * p['patch_accuracy'], 1)} | "
                         f"{_pct(100 * p['foreground_iou'], 1)} | {_pct(100 * p['background_iou'], 1)} |{knn}")
    differences = stage_differences(rows, args)
    if differences:
        lines += [
            "",
            "## What each stage changes",
            "",
            "Differences between backbones, in points. Probe mIoU: ± the standard deviation of the difference over "
            f"the same {BOOTSTRAP} resamples of the test images for both (paired; the spread of the test sample, "
            f"not of training). kNN@20: no spread computed; {binomial_note(done, args)}.",
            "",
            "| difference | what | " + " | ".join(f"probe mIoU {s} px" for s in args.probe_sizes) + " | "
            + " | ".join(f"kNN@20 {s} px" for s in args.knn_sizes) + " | run's final kNN@20 |",
            "| --- | --- |" + " ---: |" * (len(args.probe_sizes) + len(args.knn_sizes) + 1),
        ]
        for label, what, later, earlier in differences:
            cells = []
            for size in args.probe_sizes:
                p, q = later["probe"][size], earlier["probe"][size]
                delta = 100 * (p["miou"] - q["miou"])
                if p.get("miou_bootstrap") and q.get("miou_bootstrap"):
                    paired = [x - y for x, y in zip(p["miou_bootstrap"], q["miou_bootstrap"])]
                    cells.append(f"{delta:+.1f} ± {100 * _std(paired):.1f}")
                else:
                    cells.append(f"{delta:+.1f}")
            cells += [f"{later['knn'][s] - earlier['knn'][s]:+.2f}" for s in args.knn_sizes]
            logged = (later.get("logged_final_knn"), earlier.get("logged_final_knn"))
            cells.append(f"{logged[0] - logged[1]:+.2f}" if None not in logged else "-")
            lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Within-image cosine similarities of the tokens",
        "",
        f"Mean cosine similarity of two distinct patch tokens of one image (all pairs; foreground-foreground, "
        f"background-background, foreground-background pairs, by the probe's patch labels) and of the CLS token "
        f"with its image's foreground / background patch tokens, over the probe's {args.probe_test:,} test images. "
        "Patch tokens that collapse towards one direction (or towards the CLS token) push them all towards 1.",
        "",
        "| backbone | size | all pairs | fg-fg | bg-bg | fg-bg | CLS-fg | CLS-bg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in args.probe_sizes:
        for b in done:
            s = b["similarity"][size]
            lines.append(f"| {b['name']} | {size} px | " + " | ".join(
                _pct(s[k], 3) for k in ("all", "fg_fg", "bg_bg", "fg_bg", "cls_fg", "cls_bg")) + " |")
    if results.get("pca_figure"):
        rel = os.path.relpath(results["pca_figure"], Path(args.report).parent)
        lines += [
            "",
            f"## PCA of the patch tokens at {args.pca_size} px",
            "",
            "The first three principal components of each backbone's patch tokens as red, green and blue (one PCA per "
            "backbone over the six images, each component min-max scaled over them), of the first test image of "
            f"classes {', '.join(map(str, args.pca_classes))} (test indices "
            f"{', '.join(map(str, results.get('pca_test_indices', [])))}).",
            "",
            f"![PCA of the patch tokens]({rel})",
        ]
    lines += ["", "## Reading", "", "_To be written from the numbers above._", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nogram", type=Path, default=Path("/work/runs/v3_nogram"), help="run A (no Gram)")
    parser.add_argument("--gram", type=Path, default=Path("/work/runs/v3_gram"), help="run B (the Gram stage)")
    parser.add_argument("--highres", type=Path, default=Path("/work/runs/v3_highres"),
                        help="run C (the high-resolution stage)")
    parser.add_argument("--gram-start", type=int, default=300, help="the step B starts from (A's checkpoint)")
    parser.add_argument("--gram-end", type=int, default=400, help="the last step of A and B")
    parser.add_argument("--highres-end", type=int, default=500, help="the last step of C")
    parser.add_argument("--print-stage-commands", action="store_true",
                        help="print the commands of the three runs for these run directories and exit")
    parser.add_argument("--knn-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--knn-train-samples", type=int, default=5000,
                        help="kNN memory: the first N training images (0: all 60,000)")
    parser.add_argument("--knn-test-samples", type=int, default=2000, help="kNN queries: the first N test images "
                        "(0: all 10,000)")
    parser.add_argument("--probe-sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--probe-train", type=int, default=2000, help="patch probe: training images")
    parser.add_argument("--probe-test", type=int, default=1000, help="patch probe: test images")
    parser.add_argument("--probe-cs", type=float, nargs="+", default=[1.0],
                        help="logistic regression C (several: chosen on held-out training images)")
    parser.add_argument("--threshold", type=float, default=pp.DEFAULT_THRESHOLD,
                        help="foreground pixel intensity (in [0, 1])")
    parser.add_argument("--patch-knn-train", type=int, default=500,
                        help="patch kNN memory: the patches of the first N probe training images (0: no patch kNN)")
    parser.add_argument("--patch-knn-test", type=int, default=250, help="patch kNN queries: the first N test images")
    parser.add_argument("--pca-size", type=int, default=64)
    parser.add_argument("--pca-classes", type=int, nargs="+", default=[0, 1, 3, 5, 8, 9],
                        help="the PCA picture shows the first test image of each of these classes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "dinov3_stages.md")
    parser.add_argument("--pictures-dir", type=Path, default=REPO / "benchmarks" / "dinov3_stages")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_stage_commands:
        print("\n".join(stage_commands(args.nogram, args.gram, args.highres, gram_start=args.gram_start,
                                       gram_end=args.gram_end)))
        return 0
    results = run(args)
    args.pictures_dir.mkdir(parents=True, exist_ok=True)
    (args.pictures_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    command = "python benchmarks/dinov3_stages.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(results, args, command.strip())
    args.report.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
