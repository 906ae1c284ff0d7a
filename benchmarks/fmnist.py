"""Fashion-MNIST benchmark: DINOv2 pretraining (quickstart and a longer recipe) against random init and pixels.

For each recipe, pretrain with ``tools/train.py``'s loop, then evaluate the exported EMA teacher on the
official Fashion-MNIST test split (10,000 images), with the 60,000 training images as the kNN memory and the
linear probe's training set:

* weighted cosine kNN, k=20, T=0.07 (``dinoscale.train.evaluate.evaluate_knn``, the code the quickstart ends with);
* linear probe as DINOv2 evaluates it (``dinoscale.eval.linear.linear_probe``): frozen features of the last
  1 or 4 blocks' CLS tokens, with or without the average-pooled patch tokens, a grid of learning rates,
  SGD with momentum; the setting is chosen on 10% of the training images held out, then tested.

References, through the same code: the network every run starts from (same seed and model config, random
init), and kNN on the raw pixels (the flattened, normalised 28 px images; no network). Writes
``benchmarks/fmnist.md`` and ``OUT/results.json``::

    python benchmarks/fmnist.py                          # both recipes (about 55 min on 2 idle cores)
    python benchmarks/fmnist.py --recipes quickstart
    python benchmarks/fmnist.py --reuse                  # evaluate the runs already in --out-dir again
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.config import load_config  # noqa: E402
from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.eval.transforms import eval_transform  # noqa: E402
from dinoscale.eval.linear import linear_probe  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402
from dinoscale.train import loop  # noqa: E402
from dinoscale.train.build import ensure_shards  # noqa: E402
from dinoscale.train.evaluate import evaluate_knn  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from fmnist_methods import Pixels, machine_description, random_init_backbone  # noqa: E402

# name -> (config overrides on configs/quickstart.yaml, description)
RECIPES = {
    "quickstart": ([], "`configs/quickstart.yaml` as the README runs it: 4 epochs of 100 steps"),
    "long": (
        ["optim.epochs=80", "crops.local_crops_size=21", "crops.local_crops_scale=[0.15,0.5]",
         "teacher.teacher_temp=0.04", "crops.photometric_on_device=true"],
        "the quickstart with 80 epochs of 100 steps instead of 4 (same warmups), local crops of 21 px "
        "(a 3 x 3 patch grid instead of 2 x 2) from 15-50% of the image instead of 14 px from 10-40%, the "
        "teacher temperature kept at 0.04 instead of warmed up to 0.07, and the photometric augmentations "
        "batched in the training process (the same distribution, 1.4x the images/s on 2 cores)",
    ),
}


def recipe_config(name: str, out_dir: Path, extra: list[str]):
    overrides, _ = RECIPES[name]
    return load_config("quickstart", [*overrides, f"train.output_dir={out_dir / name}", "train.resume=false",
                                      "evaluation.final_knn=false", *extra])


def logged_train_seconds(run_dir: Path) -> float | None:
    """A finished run's training time from its metrics.jsonl (log-row timestamps, extended to all steps)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "type" not in r]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    return (last["time"] - first["time"]) * last["step"] / (last["step"] - first["step"])


def train_to_end(name: str, cfg) -> float:
    """Train ``cfg`` to its end with the loop (announced as ``name``); the seconds it took."""
    steps = cfg.optim.epochs * cfg.train.official_epoch_length
    print(f"== {name}: {steps} steps of batch {cfg.train.batch_size_per_rank}", flush=True)
    start = time.time()
    result = loop.train(cfg)
    if result.status != "finished":
        raise SystemExit(f"{name}: training did not finish ({result.status} at step {result.step})")
    return time.time() - start


def probe(cfg, backbone: torch.nn.Module, device: torch.device) -> dict:
    """DINOv2's linear-probe grid on frozen features (train: 60k, of which 10% for choosing; test: 10k)."""
    ev = cfg.evaluation
    transform = eval_transform(ev.knn_image_size, cfg.model.patch_size)
    train_set = open_dataset(ev.knn_train_dataset, transform=transform)
    test_set = open_dataset(ev.knn_test_dataset, transform=transform)
    backbone.eval()
    result = linear_probe(backbone, train_set, test_set, extract_batch_size=256, device=device, progress=False)
    best = result["best"]
    return {"test_top1": result["test_top1"], "setting": f"last {best['n_last_blocks']} CLS"
            + (" + avgpool" if best["avgpool"] else "") + f", lr {best['lr']:g}"}


def evaluate(cfg, backbone: torch.nn.Module, device: torch.device, *, linear: bool = True) -> dict:
    top1 = f"knn/top1@{cfg.evaluation.knn_k}"
    out = {"knn": evaluate_knn(cfg, backbone.to(device), device)[top1]}
    if linear:
        out["linear"] = probe(cfg, backbone, device)
    return out


def run(args) -> dict:
    device = resolve_device(args.device)
    results = {"recipes": {}, "threads": torch.get_num_threads(), "machine": machine_description(),
               "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
    for name in args.recipes:
        cfg = recipe_config(name, args.out_dir, args.set)
        ensure_shards(cfg)  # the one-time shard build is not part of the training time
        weights = Path(cfg.train.output_dir) / "export" / "teacher_backbone.pth"
        timed = "measured"
        if args.reuse and weights.exists():
            train_s, timed = logged_train_seconds(Path(cfg.train.output_dir)), "from the reused run's log"
        else:
            train_s = train_to_end(name, cfg)
        backbone = build_backbone(cfg.model, drop_path_rate=0.0)
        backbone.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
        start = time.time()
        entry = evaluate(cfg, backbone, device)
        entry.update(steps=cfg.optim.epochs * cfg.train.official_epoch_length, train_s=train_s, timed=timed,
                     eval_s=time.time() - start, description=RECIPES[name][1], overrides=RECIPES[name][0])
        # the network this recipe starts from (same seed and model config), evaluated the same way
        entry["random_init"] = evaluate(cfg, random_init_backbone(cfg), device)
        entry["model"] = model_description(cfg)
        results["recipes"][name] = entry
        print(f"   {name}: kNN@20 {entry['knn']:.2f}%, linear {entry['linear']['test_top1']:.2f}% "
              f"(random init {entry['random_init']['knn']:.2f}%)", flush=True)
        if "pixels_knn" not in results:
            results["pixels_knn"] = evaluate(cfg, Pixels(cfg.model.patch_size), device, linear=False)["knn"]
            results["batch"] = cfg.train.batch_size_per_rank
            results["autocast"] = cfg.train.autocast
    results["load_after"] = os.getloadavg()[0]
    results["commit"] = current_commit()
    return results


def model_description(cfg) -> str:
    m = cfg.model
    return f"ViT embed {m.embed_dim}, depth {m.depth}, heads {m.num_heads}, patch {m.patch_size}, 28 px"


def current_commit() -> str | None:
    import subprocess

    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def write_report(results: dict, args, path: Path) -> None:
    pixels = results["pixels_knn"]
    lines = [
        "# Fashion-MNIST: DINOv2 pretraining on a CPU",
        "",
        "Generated by `python benchmarks/fmnist.py" + "".join(f" --set {s}" for s in args.set)
        + "`; raw numbers in `results.json` beside the runs."
        + (f" Measured at commit {results['commit']}." if results.get("commit") else ""),
        "",
        "Models: " + "; ".join(f"{name}: {r.get('model', results.get('model'))}"  # older results.json: one model
                               for name, r in results["recipes"].items())
        + f". Full DINOv2 objective (DINO + iBOT + KoLeo), batch {results['batch']}, {results['autocast']} autocast. "
        "Each recipe is compared with its own network at random initialisation (same seed). Evaluated: the exported EMA teacher, on the official "
        "test split (10,000 images); the 60,000 training images are the kNN memory and the linear probe's "
        "training set. kNN: weighted cosine, k=20, T=0.07. Linear: DINOv2's grid (last 1 or 4 CLS tokens, with "
        "or without average-pooled patch tokens, 15 learning rates, SGD with momentum, 10 epochs), chosen on "
        "10% of the training images, then tested.",
        "",
        f"Machine: {results['machine']}, {results.get('cores', os.cpu_count())} CPU cores, {results['threads']} torch "
        "threads, no GPU" + (f"; 1-minute load average {results['load_before']:.1f} before and "
                             f"{results['load_after']:.1f} after the runs (above the core count, other work shared "
                             "the machine and the times are upper bounds)." if "load_before" in results else "."),
        "",
        "| features | steps | train time | kNN@20 | linear probe (chosen setting) |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| raw pixels (the 28 px eval image, flattened) | - | - | {pixels:.2f}% | - |",
    ]
    for name, r in results["recipes"].items():
        ri = r.get("random_init", results.get("random_init"))  # older results.json: one shared network
        lines.append(f"| {name} network, random init | 0 | - | {ri['knn']:.2f}% | {ri['linear']['test_top1']:.2f}% "
                     f"({ri['linear']['setting']}) |")
        train = "-" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min" + ("" if r["timed"] == "measured"
                                                                                      else "*")
        lines.append(f"| DINOv2, {name} recipe | {r['steps']} | {train} | **{r['knn']:.2f}%** | "
                     f"{r['linear']['test_top1']:.2f}% ({r['linear']['setting']}) |")
    best = max(r["knn"] for r in results["recipes"].values())
    lines += ["", f"The longer recipe's target is a kNN above raw pixels: {'met' if best > pixels else 'not met'} "
              f"(best {best:.2f}% against {pixels:.2f}%)."]
    lines += ["", "Recipes:"]
    lines += [f"- **{name}**: {r['description']}. Alone: `python tools/train.py --config configs/quickstart.yaml"
              + "".join(f" '{o}'" if "[" in o else f" {o}" for o in r.get("overrides", []))
              + (f" train.output_dir=./outputs/fmnist_{name}" if r.get("overrides") else "") + "`."
              for name, r in results["recipes"].items()]
    if (path.parent / "fmnist_probes.md").exists():
        lines += ["", "How the long recipe's changes were chosen (1000-step probes): "
                  "[`fmnist_probes.md`](fmnist_probes.md)."]
    lines += ["", "Train time is the training loop only (the shards are built beforehand, once); each recipe's "
              "evaluation (kNN and the linear-probe grid) adds "
              + ", ".join(f"{r['eval_s'] / 60:.1f} min ({name})" for name, r in results["recipes"].items()) + "."]
    if any(r["timed"] != "measured" for r in results["recipes"].values()):
        lines += ["", "\\* Run reused with `--reuse`: its time comes from the timestamps of its `metrics.jsonl`."]
    methods = path.parent / "fmnist_methods.md"
    if methods.exists():  # written by benchmarks/fmnist_methods.py
        table = [line for line in methods.read_text().splitlines() if line.startswith("|")]
        lines += ["", "## The other methods", "",
                  "From [`fmnist_methods.md`](fmnist_methods.md) (`python benchmarks/fmnist_methods.py`, where the "
                  "setup is described): each method's config under `configs/methods/*_fmnist.yaml`, the quickstart's "
                  "ViT and budget, kNN@20 on the test split against the same random initialisation."
                  + (f" The full DINOv2 objective reaches {results['recipes']['quickstart']['knn']:.2f}% with this "
                     "budget (quickstart row above)." if "quickstart" in results["recipes"] else ""), "", *table]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in --out-dir, train the rest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every recipe (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "fmnist_benchmark")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "fmnist.md")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from --out-dir/results.json (e.g. after fmnist_methods.py)")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((args.out_dir / "results.json").read_text())
    else:
        results = run(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args, args.report)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
