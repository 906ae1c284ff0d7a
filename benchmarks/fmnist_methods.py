"""kNN of every self-supervised method after a small Fashion-MNIST pretraining budget, against random init.

For each method with a ``configs/methods/<method>_fmnist.yaml`` (the quickstart's ViT, batch and augmentation
scale), pretrain for ``--steps`` optimizer steps with the schedules compressed to that budget (5 "epochs" of
``steps / 5`` steps: 1 epoch of warmup, cosine decay to the end), then evaluate the exported backbone (the EMA
teacher's when the method has one, else the student's) with the weighted cosine kNN (k=20) of the trained
loop (``dinoscale.train.evaluate.evaluate_knn``: its ``knn_features`` and ``knn_top1``) on the Fashion-MNIST test set. The random-init baseline is the
backbone every method starts from (same seed, same model config), evaluated once.

The same features (final-norm CLS token, eval transform) also go through the label-efficient protocol of
``dinoscale.eval.lowshot`` (MSN's: a logistic regression on 1, 2, 5 and 13 labelled images per class and on 1%
of the labels, ``--lowshot-draws`` random draws each, mean and standard deviation of the test top-1).

Writes a markdown table (default ``benchmarks/fmnist_methods.md``) and a JSON file with the raw numbers next
to the run outputs. On a shared 2-core CPU a step of the quickstart ViT at batch 128 takes 0.1-0.5 s, so
the default budget (the quickstart's 400 steps) is a few minutes per method::

    python benchmarks/fmnist_methods.py                          # all methods, 400 steps each
    python benchmarks/fmnist_methods.py --methods simclr msn --steps 200 --set optim.base_lr=0.001
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.config import CONFIG_DIR, load_config  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402
from dinoscale.train import loop  # noqa: E402
from dinoscale.eval.lowshot import lowshot_probe  # noqa: E402
from dinoscale.train.evaluate import knn_features, knn_top1  # noqa: E402

METHODS = ("dino", "ibot", "simclr", "barlow_twins", "simmim", "msn", "pirl", "beit")
SHOTS = (1, 2, 5, 13)  # MSN's label-efficient settings, plus 1% of the labels (60 images of each class here)
EPOCHS = 5  # the budget is split into this many scheduling "epochs"


def method_config(method: str, steps: int, out_dir: Path, knn_train_samples: int, extra: list[str]):
    path = CONFIG_DIR / "methods" / f"{method}_fmnist.yaml"
    if not path.exists():
        raise SystemExit(f"no Fashion-MNIST config for '{method}': {path} does not exist")
    return load_config(path, [
        f"train.output_dir={out_dir / method}",
        f"optim.epochs={EPOCHS}",
        f"train.official_epoch_length={steps // EPOCHS}",
        f"train.checkpoint_every={steps}",
        "train.tensorboard=false",
        "train.resume=false",
        "evaluation.final_knn=false",  # evaluated here, with the random-init baseline computed once
        f"evaluation.knn_max_train_samples={'null' if knn_train_samples is None else knn_train_samples}",
        *extra,
    ])


def ensure_tokenizer(cfg) -> float | None:
    """BEiT predicts the tokens of a trained dVAE: train it first (``tools/train_tokenizer.py`` with the method's
    config, as the config's header says) when ``beit.tokenizer`` does not exist yet. Returns the seconds spent."""
    if "beit" not in cfg or not cfg.beit.tokenizer or (REPO / str(cfg.beit.tokenizer)).exists():
        return None
    command = [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--config",
               str(CONFIG_DIR / "methods" / "beit_fmnist.yaml")]
    print("   training the tokenizer first:", " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    return time.time() - start


def trained_backbone(cfg, result) -> tuple[torch.nn.Module, str]:
    """The exported backbone of a finished run (teacher if the method has one, else student), and which."""
    export = Path(result.output_dir) / "export"
    weights = export / "teacher_backbone.pth"
    if not weights.exists():
        weights = export / "student_backbone.pth"
    backbone = build_backbone(cfg.model, drop_path_rate=0.0)
    backbone.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
    return backbone, weights.name.split("_")[0]


class Pixels(torch.nn.Module):
    """The raw-pixel reference: flattened normalised pixels through the same kNN (no network)."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size  # the eval transform rounds the image size to it, as for the backbones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def random_init_backbone(cfg) -> torch.nn.Module:
    # The loop seeds with train.seed and builds the student's backbone first: this is that network.
    torch.manual_seed(cfg.train.seed)
    return build_backbone(cfg.model, drop_path_rate=0.0)


def evaluate(cfg, network: torch.nn.Module, device, draws: int) -> dict:
    """kNN top-1 and the low-shot settings' mean/std top-1 of one network, from one feature extraction."""
    train_feats, test_feats = knn_features(cfg, network.to(device), device)
    knn = knn_top1(cfg, train_feats, test_feats)[f"knn/top1@{cfg.evaluation.knn_k}"]
    if draws <= 0:
        return {"knn": knn, "lowshot": {}}
    caches = [{"cls_blocks": f["cls"].float(), "labels": f["labels"]} for f in (train_feats, test_feats)]
    probe = lowshot_probe(*caches, shots=SHOTS, percents=(1.0,), draws=draws, seed=cfg.train.seed)
    lowshot = {name: {"mean": row["mean_top1"], "std": row["std_top1"], "num_labelled": row["num_labelled"]}
               for name, row in probe["settings"].items()}
    return {"knn": knn, "lowshot": lowshot}


def run(args) -> tuple[list[dict], dict | None]:
    device = resolve_device(args.device)
    results, baselines, pixels = [], {}, None
    for method in args.methods:
        cfg = method_config(method, args.steps, args.out_dir, args.knn_train_samples, args.set)
        print(f"== {method}: {args.steps} steps of batch {cfg.train.batch_size_per_rank}", flush=True)
        tokenizer_s = ensure_tokenizer(cfg)
        start = time.time()
        result = loop.train(cfg)
        train_s = time.time() - start
        rows = [json.loads(x) for x in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()
                if x.strip() and '"type"' not in x]
        final_losses = [r["loss"] for r in rows[-3:] if r.get("loss") is not None]

        # The random-init baseline depends only on the model config and the seed.
        key = json.dumps([dict(cfg.model), cfg.train.seed], sort_keys=True, default=str)
        if key not in baselines:
            baselines[key] = evaluate(cfg, random_init_backbone(cfg), device, args.lowshot_draws)
        if pixels is None:
            pixels = evaluate(cfg, Pixels(cfg.model.patch_size), device, args.lowshot_draws)
        backbone, which = trained_backbone(cfg, result)
        trained = evaluate(cfg, backbone, device, args.lowshot_draws)
        entry = {
            "method": method,
            "steps": result.step,
            "batch_size": cfg.train.batch_size_per_rank,
            "base_lr": cfg.optim.base_lr,
            "train_s": round(train_s, 1),
            "tokenizer_s": None if tokenizer_s is None else round(tokenizer_s, 1),
            "s_per_step": round(train_s / max(result.step, 1), 2),
            "final_loss": round(sum(final_losses) / len(final_losses), 4) if final_losses else None,
            "evaluated": which,
            "knn_random_init": baselines[key]["knn"],
            "knn_trained": trained["knn"],
            "lowshot_random_init": baselines[key]["lowshot"],
            "lowshot_trained": trained["lowshot"],
            "overrides": args.set,
            "model": (f"embed {cfg.model.embed_dim}, depth {cfg.model.depth}, patch {cfg.model.patch_size}, "
                      f"{cfg.crops.global_crops_size} px, LayerScale {cfg.model.layerscale}"),
            "layerscale": cfg.model.layerscale,
        }
        entry["delta"] = entry["knn_trained"] - entry["knn_random_init"]
        results.append(entry)
        print(f"   kNN@{cfg.evaluation.knn_k}: trained {entry['knn_trained']:.2f}% vs random init "
              f"{entry['knn_random_init']:.2f}% ({entry['delta']:+.2f}) in {train_s:.0f} s", flush=True)
    return results, pixels


def machine_description() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pct(value: float) -> str:
    # knn_classify reports top-1 in percent
    return f"{value:.2f}"


def _mean_std(cell: dict | None) -> str:
    return "-" if not cell else f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def lowshot_table(results: list[dict], pixels: dict | None, draws: int) -> list[str]:
    """The label-efficient table: one row per trained method, then random init and raw pixels."""
    names = [f"{k}-shot" for k in SHOTS] + ["1%"]
    rows = [(f"{r['method']} ({r['evaluated']})", r["lowshot_trained"]) for r in results]
    for r in results:  # one random-init row per model (the first row's model unnamed)
        if r["model"] == results[0]["model"] and r is not results[0]:
            continue
        rows.append(("random init" if r is results[0] else f"random init ({r['method']}'s model)",
                     r["lowshot_random_init"]))
    if pixels is not None:
        rows.append(("raw pixels", pixels["lowshot"]))
    counts = next((cells for _, cells in rows if cells), {})
    lines = [
        "## Label-efficient evaluation (MSN's protocol)",
        "",
        f"The same frozen features (final-norm CLS token) through `dinoscale.eval.lowshot`: a logistic regression "
        f"(C = 1, features centred and L2-normalised) trained on k labelled images per class or on 1% of the "
        f"labels, {draws} random draws of the labelled subset each, test top-1 (%) as mean ± standard deviation "
        "over the draws, on the 10,000 test images.",
        "",
        "| features | " + " | ".join(f"{n} ({counts[n]['num_labelled']} images)" if n in counts else n
                                    for n in names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(_mean_std(cells.get(n)) for n in names) + " |")
    return lines


def write_table(results: list[dict], pixels: dict | None, args, path: Path) -> None:
    lines = [
        "# Self-supervised methods on Fashion-MNIST: kNN after a small budget",
        "",
        f"Generated by `python benchmarks/fmnist_methods.py --steps {args.steps}"
        + (f" --knn-train-samples {args.knn_train_samples}" if args.knn_train_samples else "")
        + (f" --lowshot-draws {args.lowshot_draws}" if args.lowshot_draws != 5 else "")
        + "".join(f" --set {s}" for s in args.set) + f"` at commit {args.commit}.",
        "",
        f"Each method trains the quickstart-sized ViT ({results[0]['model'] if results else '-'}) from its "
        f"`configs/methods/<method>_fmnist.yaml` for **{args.steps} optimizer steps** (schedules compressed to the "
        "budget: warmup over the first fifth, cosine decay to the end), then the exported backbone (EMA teacher "
        "when the method has one) is evaluated with weighted cosine kNN, k=20, on the 10,000 test images"
        + (f", with the first {args.knn_train_samples} training images as the kNN memory" if args.knn_train_samples
           else ", with the 60,000 training images as the kNN memory")
        + ". *Random init* is the backbone every run starts from (same seed and model config).",
        "",
        f"Machine: {machine_description()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
        f"no GPU; 1-minute load average {args.load_before:.1f} before the runs and {args.load_after:.1f} after "
        "(above the core count, other work shared the machine and the times are upper bounds). This budget is a few minutes per method, a sliver of a real schedule: the table says whether each "
        "objective starts to learn useful features, not how good it ends up.",
        "",
        "| method | steps | batch | base lr | train time | s/step | final loss | kNN@20 random init | kNN@20 trained "
        "| change |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4g}"
        lines.append(
            f"| {r['method']} ({r['evaluated']}) | {r['steps']} | {r['batch_size']} | {r['base_lr']:g} | "
            f"{r['train_s'] / 60:.1f} min | "
            f"{r['s_per_step']} | {loss} | {_pct(r['knn_random_init'])}% | {_pct(r['knn_trained'])}% | "
            f"{r['delta']:+.2f} |"
        )
    other_models = [r for r in results if r["model"] != results[0]["model"]]
    if other_models:
        lines += ["", "Rows with another model (each against the random init of its own model): " + "; ".join(
            f"{r['method']}: {r['model']}" for r in other_models) + "."]
    for r in results:
        if r.get("tokenizer_s") is not None:
            lines += ["", f"{r['method']}'s train time leaves out its dVAE tokenizer's, trained first because it did "
                      f"not exist yet: {r['tokenizer_s'] / 60:.1f} min (`python tools/train_tokenizer.py --config "
                      f"configs/methods/{r['method']}_fmnist.yaml`)."]
    beaten = [r["method"] for r in results if r["delta"] <= 0]
    lines += ["", "Every method beats its random initialisation at this budget." if not beaten else
              f"Not above their random initialisation at this budget: {', '.join(beaten)}."]
    if pixels is not None:
        above = [r["method"] for r in results if r["knn_trained"] > pixels["knn"]]
        lines += [
            "",
            f"Reference: the same kNN on raw pixels (flattened, normalised 28 px images) reaches {_pct(pixels['knn'])}%; "
            f"{len(above)} of {len(results)} methods exceed it at this budget"
            + (f" ({', '.join(above)})" if above else "") + "."
            + (" A random-init backbone with LayerScale scores far below the pixels: its residual branches start "
               "scaled by a tiny factor, so its [CLS] output hardly depends on the image."
               if any(r["layerscale"] for r in results) else ""),
        ]
    if args.lowshot_draws > 0:
        lines += [""] + lowshot_table(results, pixels, args.lowshot_draws)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to run (default: all)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per method (a multiple of 5)")
    parser.add_argument("--knn-train-samples", type=int, default=0,
                        help="kNN memory: the first N training images (0: all 60,000)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every method (repeatable)")
    parser.add_argument("--lowshot-draws", type=int, default=5,
                        help="random labelled subsets per low-shot setting (0: no low-shot table)")
    parser.add_argument("--render-only", action="store_true",
                        help="only write the tables again from --out-dir's results.json (a previous run's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "fmnist_methods")
    parser.add_argument("--table", type=Path, default=REPO / "benchmarks" / "fmnist_methods.md")
    args = parser.parse_args(argv)
    if args.steps < EPOCHS or args.steps % EPOCHS != 0:
        parser.error(f"--steps must be a positive multiple of {EPOCHS}, got {args.steps}")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    args.knn_train_samples = args.knn_train_samples or None
    if args.render_only:  # the tables again from the results a previous run saved (nothing trained or evaluated)
        saved = json.loads((args.out_dir / "results.json").read_text())
        args.__dict__.update(saved["args"])
        write_table(saved["methods"], saved["pixels"], args, args.table)
        print(f"wrote {args.table}")
        return 0

    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip() or "unknown"
    args.load_before = os.getloadavg()[0]
    results, pixels = run(args)
    args.load_after = os.getloadavg()[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    saved_args = {k: getattr(args, k) for k in ("steps", "knn_train_samples", "lowshot_draws", "set", "commit",
                                                "load_before", "load_after")}
    (args.out_dir / "results.json").write_text(json.dumps({"methods": results, "pixels": pixels,
                                                           "args": saved_args}, indent=1))
    write_table(results, pixels, args, args.table)
    print(f"wrote {args.table}")
    failed = [r["method"] for r in results if r["delta"] <= 0]
    if failed:
        print(f"did not beat random init: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
