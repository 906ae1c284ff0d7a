"""Continued pretraining from the quickstart's export: new heads from k-means and a heads-only warm-up, or not.

A released DINOv2/DINOv3 backbone comes without its DINO/iBOT heads; continuing its self-supervised training with
new random heads lets their arbitrary targets pull the backbone away from what it knew. The Fashion-MNIST stand-in:
the quickstart's exported teacher backbone (``configs/quickstart.yaml``, kNN@20 about 75%) is trained further with
``configs/continue_fmnist.yaml`` for the same number of steps in four ways:

* ``random heads``: new random heads, the whole network trained from the first step (the naive continuation);
* ``random heads + warm-up``: the backbone frozen for ``continued.backbone_warmup_steps`` steps first;
* ``k-means heads``: prototypes from k-means of the backbone's features (``continued.head_init=kmeans``), no warm-up;
* ``k-means heads + warm-up``: both (the config as written).

Each exported EMA teacher is evaluated as ``benchmarks/fmnist.py`` evaluates (its ``evaluate``: weighted cosine
kNN, k=20, T=0.07, 60,000 training images as memory, the 10,000 test images; DINOv2's linear-probe grid), beside
the starting point itself. During training, the kNN is also measured every ``--period`` steps on a subset (the
first 5,000 training images as memory, 1,000 test images) to show the way there. Prints a markdown table and the
raw numbers (JSON), and writes them to ``--report`` and ``OUT/results.json``::

    python benchmarks/continued_pretraining.py --start outputs/quickstart      # a finished quickstart run
    python benchmarks/continued_pretraining.py --start runs/qs --linear \
        --variants "random heads" "k-means heads + warm-up"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale.config import load_config  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.models.factory import build_backbone  # noqa: E402
from dinoscale.train.build import ensure_shards  # noqa: E402
from dinoscale.train.continue_from import load_pretrained_backbone  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from fmnist import current_commit, evaluate, train_to_end  # noqa: E402
from fmnist_methods import machine_description  # noqa: E402

# name -> config overrides on configs/continue_fmnist.yaml
VARIANTS = {
    "random heads": ["continued.head_init=random", "continued.backbone_warmup_steps=0"],
    "random heads + warm-up": ["continued.head_init=random"],
    "k-means heads": ["continued.backbone_warmup_steps=0"],
    "k-means heads + warm-up": [],
}
SUBSET = ["evaluation.knn_max_train_samples=5000", "evaluation.knn_max_test_samples=1000"]


def variant_config(name: str, weights: Path, out_dir: Path, extra: list[str], *, period: int = 0):
    """The continue_fmnist config of variant ``name`` from ``weights``; with ``period``, the run measures the kNN
    on a subset every ``period`` steps (the final evaluation uses a config without it)."""
    during = [f"evaluation.period={period}", *SUBSET] if period else []
    return load_config("continue_fmnist", [
        f"model.pretrained_weights={weights}", f"train.output_dir={out_dir / name.replace(' ', '_')}",
        "train.resume=false", "evaluation.final_knn=false", "train.tensorboard=false", *VARIANTS[name], *extra,
        *during])


def knn_during_training(run_dir: Path, k: int) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r[f"knn/top1@{k}"]) for r in rows if r.get("type") == "eval"]


def start_weights(start: Path) -> Path:
    weights = start / "export" / "teacher_backbone.safetensors"
    if not weights.exists():
        raise SystemExit(f"{weights} does not exist: run the quickstart first (python tools/train.py --config "
                         f"configs/quickstart.yaml train.output_dir={start}) and let it finish")
    return weights


def run(args) -> dict:
    device = resolve_device(args.device)
    weights = start_weights(args.start)
    results = {"start": str(args.start), "variants": {}, "machine": machine_description(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "set": args.set}
    base = variant_config("k-means heads + warm-up", weights, args.out_dir, args.set)
    ensure_shards(base)  # once, before the timed runs
    start_net = build_backbone(base.model, drop_path_rate=0.0)
    load_pretrained_backbone(start_net, base.model)
    results["start_eval"] = evaluate(base, start_net, device, linear=args.linear)
    subset = load_config("continue_fmnist", [*SUBSET, *args.set])
    results["start_eval"]["knn_subset"] = evaluate(subset, start_net, device, linear=False)["knn"]
    print(f"== start ({weights}): kNN@20 {results['start_eval']['knn']:.2f}%", flush=True)
    results.update(steps=base.optim.epochs * base.train.official_epoch_length,
                   warmup_steps=base.continued.backbone_warmup_steps, base_lr=base.optim.base_lr,
                   batch=base.train.batch_size_per_rank, head_init_batches=base.continued.head_init_batches)
    for name in args.variants:
        cfg = variant_config(name, weights, args.out_dir, args.set, period=args.period)
        train_s = train_to_end(name, cfg)
        trained = build_backbone(cfg.model, drop_path_rate=0.0)
        trained.load_state_dict(torch.load(Path(cfg.train.output_dir) / "export" / "teacher_backbone.pth",
                                           map_location="cpu"), strict=True)
        final_cfg = variant_config(name, weights, args.out_dir, args.set)  # the full kNN sets
        entry = evaluate(final_cfg, trained, device, linear=args.linear)
        entry.update(train_s=train_s, overrides=VARIANTS[name], head_init=cfg.continued.head_init,
                     warmup_steps=cfg.continued.backbone_warmup_steps,
                     during=knn_during_training(Path(cfg.train.output_dir), cfg.evaluation.knn_k))
        results["variants"][name] = entry
        print(f"   {name}: kNN@20 {entry['knn']:.2f}%" + (f", linear {entry['linear']['test_top1']:.2f}%"
                                                           if args.linear else ""), flush=True)
    results["load_after"] = os.getloadavg()[0]
    results["commit"] = current_commit()
    return results


def markdown(results: dict, command: str) -> str:
    start = results["start_eval"]
    linear = "linear" in start
    during_steps = next((s for s in (([step for step, _ in v["during"]] for v in results["variants"].values()))
                         if s), [])
    head = ["continued from the quickstart's export", "head init", "backbone warm-up", "train time",
            f"kNN@20 on the subset during training (steps {', '.join(map(str, during_steps))})", "kNN@20"]
    head += ["linear probe"] if linear else []
    lines = [
        "# Continued pretraining from the quickstart's export",
        "",
        f"Generated by `{command}`" + (f" at commit {results['commit']}" if results.get("commit") else "") + ".",
        "",
        f"Start: `{results['start']}/export/teacher_backbone.safetensors`, the EMA teacher of a "
        "`configs/quickstart.yaml` run. Each row trains it further with `configs/continue_fmnist.yaml` for "
        f"{results['steps']} steps (batch {results['batch']}, base lr {results['base_lr']:g}, new heads, "
        "the full DINOv2 objective)"
        + (f", with `{' '.join(results['set'])}`" if results["set"] else "")
        + f"; the warm-up trains the heads alone for the first {results['warmup_steps']} of them; the k-means uses "
        f"{results['head_init_batches']} batches. Evaluated: the exported EMA teacher; kNN (weighted cosine, k=20, "
        "T=0.07) with the 60,000 training images as memory on the 10,000 test images"
        + ("; linear: DINOv2's grid as in `benchmarks/fmnist.py`" if linear else "")
        + ". During training the kNN is measured on a subset (the first 5,000 training images as memory, 1,000 test "
        "images).",
        "",
        f"Machine: {results['machine']}, {results['cores']} cores, {results['threads']} torch threads, no GPU; "
        f"1-minute load average {results['load_before']:.1f} before and {results['load_after']:.1f} after (other "
        "work shared the machine: the times are upper bounds).",
        "",
        "| " + " | ".join(head) + " |",
        "| --- | --- | ---: | ---: | --- | ---: |" + (" ---: |" if linear else ""),
        f"| start (no further training) | - | - | - | {start['knn_subset']:.2f}% | {start['knn']:.2f}% |"
        + (f" {start['linear']['test_top1']:.2f}% |" if linear else ""),
    ]
    for name, v in results["variants"].items():
        during = ", ".join(f"{knn:.1f}" for _, knn in v["during"])
        lines.append(f"| {name} | {v['head_init']} | {v['warmup_steps']} steps | {v['train_s'] / 60:.1f} min | "
                     f"{during} | **{v['knn']:.2f}%** |" + (f" {v['linear']['test_top1']:.2f}% |" if linear else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, default=REPO / "outputs" / "quickstart",
                        help="a finished quickstart run directory (its export/teacher_backbone.safetensors)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--period", type=int, default=50, help="steps between the subset kNN during training")
    parser.add_argument("--linear", action="store_true", help="also DINOv2's linear-probe grid (minutes per network)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "continued_pretraining")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "continued_pretraining.md")
    args = parser.parse_args(argv)
    results = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    command = "python benchmarks/continued_pretraining.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    table = markdown(results, command.strip())
    args.report.write_text(table)
    print(table)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
