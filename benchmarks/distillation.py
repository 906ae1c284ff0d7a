"""Distillation on Fashion-MNIST: a small student distilled from the long recipe's network, against the same student
trained from scratch with DINOv2 for the same number of steps, at random init, and against the teacher itself.

The student is ``configs/methods/distillation_fmnist.yaml``'s ViT (depth 2, width 96, 3 heads, the quickstart's 7 px
patches). Runs, each for ``--steps`` optimizer steps with the schedules compressed to that budget (``EPOCHS``
"epochs" of ``steps / EPOCHS`` steps, one of warmup):

* ``distilled``: ``configs/methods/distillation_fmnist.yaml``, DINOv2's distillation against the teacher's heads;
* ``distilled_features``: the same with the head-free objective (``distillation.objective=features``);
* ``scratch``: the student trained from scratch with the DINOv2 recipe the teacher was trained with
  (``configs/quickstart.yaml`` with the long recipe's changes, ``benchmarks/fmnist.py``), at the student's size;

and, without training, the student at random init (the network every run starts from) and the teacher (its
exported EMA backbone, or its newest checkpoint's while it is still training). Each is evaluated like
``benchmarks/fmnist.py`` does (its ``evaluate``): weighted cosine kNN@20 on the 10,000 test images with the
60,000 training images as memory, and DINOv2's linear-probe grid. Prints a markdown table, writes
``OUT/results.json`` and ``benchmarks/distillation.md``::

    python benchmarks/distillation.py --teacher ./outputs/fmnist_long --steps 600
    python benchmarks/distillation.py --teacher ./outputs/fmnist_long --runs distilled scratch --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoscale.checkpoint import latest_checkpoint  # noqa: E402
from dinoscale.config import CONFIG_DIR, load_config  # noqa: E402
from dinoscale.device import resolve_device  # noqa: E402
from dinoscale.eval.backbones import load_backbone  # noqa: E402
from dinoscale.train import loop  # noqa: E402
from dinoscale.train.build import ensure_shards  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from fmnist import RECIPES, current_commit, evaluate, logged_train_seconds  # noqa: E402
from fmnist_methods import machine_description, random_init_backbone, trained_backbone  # noqa: E402

EPOCHS = 10  # the budget is split into this many scheduling "epochs" (the first one warms up)
STUDENT = ["model.embed_dim=96", "model.depth=2", "model.num_heads=3"]  # distillation_fmnist.yaml's student
DISTILLATION_CONFIG = CONFIG_DIR / "methods" / "distillation_fmnist.yaml"

# name -> (config, overrides, description)
RUNS = {
    "distilled": (DISTILLATION_CONFIG, [],
                  "DINOv2's distillation (DINO [CLS] + iBOT + KoLeo against the frozen teacher's heads, unmasked "
                  "student crops), `configs/methods/distillation_fmnist.yaml`"),
    "distilled_features": (DISTILLATION_CONFIG, ["distillation.objective=features", "distillation.projector_hidden_dim=512"],
                           "head-free distillation (cosine to the teacher's standardised [CLS] and patch tokens "
                           "through a 512-wide projector), the same config with `distillation.objective=features`"),
    "scratch": (CONFIG_DIR / "quickstart.yaml",
                [*(o for o in RECIPES["long"][0] if not o.startswith("optim.epochs=")), *STUDENT],
                "DINOv2 from scratch with the teacher's own recipe (the long recipe of `benchmarks/fmnist.py`: "
                "`configs/quickstart.yaml` with local crops of 21 px from 15-50%, teacher temperature 0.04, "
                "batched photometry) at the student's size"),
}


def run_config(name: str, args, teacher_dir: Path):
    path, overrides, _ = RUNS[name]
    teacher = [f"distillation.teacher={teacher_dir}"] if path == DISTILLATION_CONFIG else []
    return load_config(path, [*overrides, *teacher,
                              f"optim.epochs={EPOCHS}", f"train.official_epoch_length={args.steps // EPOCHS}",
                              "optim.warmup_epochs=1", f"train.checkpoint_every={args.steps}",
                              f"train.output_dir={args.out_dir / name}", "train.resume=false",
                              "train.tensorboard=false", "evaluation.final_knn=false", *args.set])


def snapshot_teacher(teacher: Path, snapshot: Path) -> Path:
    """A copy of the teacher run's weights in use (its export, else its newest checkpoint) with its config, so that
    every run of the benchmark learns from the same weights while the teacher run goes on (kept with --reuse)."""
    if (snapshot / "config.yaml").exists():
        return snapshot
    snapshot.mkdir(parents=True)
    shutil.copy2(teacher / "config.yaml", snapshot / "config.yaml")
    if (teacher / "export").is_dir():
        shutil.copytree(teacher / "export", snapshot / "export")
    else:
        latest = latest_checkpoint(teacher)
        if latest is None:
            raise SystemExit(f"{teacher} has neither an export nor a checkpoint to distil from")
        shutil.copytree(latest, snapshot / "checkpoints" / latest.name)
    (snapshot / "metrics.jsonl").write_text((teacher / "metrics.jsonl").read_text()
                                            if (teacher / "metrics.jsonl").exists() else "")
    return snapshot


def teacher_state(teacher: Path) -> dict:
    """Which weights of the teacher run are used: its export (finished) or its newest checkpoint (still training),
    and the final kNN@20 its log reports, if any."""
    metrics = teacher / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    final = [r for r in rows if r.get("type") == "final_knn"]
    if (teacher / "export" / "teacher_backbone.safetensors").exists() or (teacher / "export" / "teacher_backbone.pth").exists():
        return {"weights": "export", "step": final[-1]["step"] if final else None,
                "logged_knn": final[-1]["teacher"] if final else None}
    latest = latest_checkpoint(teacher)
    return {"weights": latest.name if latest else None, "step": int(latest.name.split("_")[1]) if latest else None,
            "logged_knn": None}


def run(args) -> dict:
    device = resolve_device(args.device)
    teacher_dir = snapshot_teacher(args.teacher, args.out_dir / "teacher")
    results = {"runs": {}, "steps": args.steps, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
               "machine": machine_description(), "load_before": os.getloadavg()[0], "teacher_dir": str(args.teacher),
               "teacher_state": teacher_state(teacher_dir), "commit": current_commit()}
    cfg = None
    for name in args.runs:
        cfg = run_config(name, args, teacher_dir)
        ensure_shards(cfg)  # the one-time shard build is not part of the training time
        out = Path(cfg.train.output_dir)
        if args.reuse and (out / "export" / "teacher_backbone.pth").exists():
            train_s, timed = logged_train_seconds(out), "from the reused run's log"
        else:
            print(f"== {name}: {args.steps} steps of batch {cfg.train.batch_size_per_rank}", flush=True)
            start = time.time()
            result = loop.train(cfg)
            train_s, timed = time.time() - start, "measured"
            if result.status != "finished":
                raise SystemExit(f"{name}: training did not finish ({result.status} at step {result.step})")
        backbone, _ = trained_backbone(cfg, loop.TrainResult("finished", args.steps, str(out)))
        entry = evaluate(cfg, backbone, device)
        entry.update(train_s=train_s, timed=timed, description=RUNS[name][2], overrides=RUNS[name][1])
        results["runs"][name] = entry
        print(f"   {name}: kNN@20 {entry['knn']:.2f}%, linear {entry['linear']['test_top1']:.2f}%", flush=True)
    cfg = cfg or run_config("distilled", args, teacher_dir)
    results["random_init"] = evaluate(cfg, random_init_backbone(cfg), device)
    print(f"   random init: kNN@20 {results['random_init']['knn']:.2f}%", flush=True)
    teacher = load_backbone(weights=str(teacher_dir))  # its export, or its newest checkpoint's EMA teacher
    teacher_cfg = load_config(teacher_dir / "config.yaml")
    results["teacher"] = evaluate(teacher_cfg, teacher, device)
    results["teacher"]["model"] = model_description(teacher_cfg)
    results["teacher"]["train_epochs"] = teacher_cfg.optim.epochs
    results["teacher"]["train_steps"] = teacher_cfg.optim.epochs * teacher_cfg.train.official_epoch_length
    print(f"   teacher: kNN@20 {results['teacher']['knn']:.2f}%", flush=True)
    results["student_model"] = model_description(cfg)
    results["load_after"] = os.getloadavg()[0]
    return results


def model_description(cfg) -> str:
    m = cfg.model
    return f"ViT embed {m.embed_dim}, depth {m.depth}, heads {m.num_heads}, patch {m.patch_size}"


def teacher_steps(results: dict) -> str:
    """The teacher run's scheduled length, and how it differs from the long recipe's 8000 steps."""
    steps = results["teacher"].get("train_steps")
    if steps is None or steps == 8000:
        return "8000 steps"
    return f"{steps} steps (`optim.epochs={results['teacher']['train_epochs']}` instead of 80, its schedules ending there)"


def teacher_command(results: dict) -> str:
    """The command that trains the teacher: the long recipe at the teacher's length, into its run directory."""
    epochs = results["teacher"].get("train_epochs", 80)
    overrides = [f"optim.epochs={epochs}" if o.startswith("optim.epochs=") else o for o in RECIPES["long"][0]]
    quoted = [f"'{o}'" if "[" in o else o for o in overrides]
    return ("python tools/train.py --config configs/quickstart.yaml " + " ".join(quoted)
            + f" train.output_dir={results['teacher_dir']}")


def table(results: dict) -> list[str]:
    rows = ["| features | steps | train time | kNN@20 | linear probe (chosen setting) |",
            "| --- | ---: | ---: | ---: | --- |"]

    def row(label, entry, steps="-", train="-"):
        lin = entry["linear"]
        return f"| {label} | {steps} | {train} | {entry['knn']:.2f}% | {lin['test_top1']:.2f}% ({lin['setting']}) |"

    state = results["teacher_state"]
    teacher_steps = state["step"] if state["step"] is not None else "?"
    rows.append(row(f"teacher ({results['teacher']['model']})", results["teacher"], steps=teacher_steps))
    rows.append(row("student, random init", results["random_init"], steps=0))
    labels = {"scratch": "student, DINOv2 from scratch", "distilled": "student, distilled (heads)",
              "distilled_features": "student, distilled (head-free features)"}
    for name, entry in results["runs"].items():
        train = f"{entry['train_s'] / 60:.1f} min" + ("" if entry["timed"] == "measured" else "*")
        rows.append(row(labels[name], entry, steps=results["steps"], train=train))
    return rows


def write_report(results: dict, args, path: Path) -> None:
    state = results["teacher_state"]
    teacher_note = (f"the teacher run's export (its final EMA teacher, step {state['step']}; its log's kNN@20: "
                    f"{state['logged_knn']:.2f}%)" if state["weights"] == "export" and state["logged_knn"] is not None
                    else f"the teacher run's export" if state["weights"] == "export"
                    else f"the teacher run's newest checkpoint, `{state['weights']}` (the run was still training: "
                         "not its final weights)")
    command = (f"python benchmarks/distillation.py --teacher {args.teacher} --steps {results['steps']}"
               + "".join(f" --set {s}" for s in args.set))
    lines = [
        "# Distillation on Fashion-MNIST: a small student from a larger network trained with the long recipe",
        "",
        f"Generated by `{command}`" + (f" at commit {results['commit']}" if results.get("commit") else "")
        + "; raw numbers in `results.json` beside the runs.",
        "",
        f"Student: {results['student_model']}, 28 px (`configs/methods/distillation_fmnist.yaml`). Teacher: "
        f"{results['teacher']['model']}, trained with the long recipe of [`fmnist.md`](fmnist.md) for "
        f"{teacher_steps(results)}, `{teacher_command(results)}`: {teacher_note}. Every student run takes "
        f"**{results['steps']} optimizer steps** of batch 128 (schedules "
        f"compressed to the budget: {EPOCHS} \"epochs\", the first one of warmup, cosine decay to the end), bf16 "
        "autocast; evaluated is the exported EMA of the student. kNN: weighted cosine, k=20, T=0.07, 60,000 "
        "training images as memory, 10,000 test images. Linear: DINOv2's grid (last 1 or 4 CLS tokens, with or "
        "without average-pooled patch tokens, 15 learning rates, SGD with momentum, 10 epochs), chosen on 10% of "
        "the training images, then tested (`benchmarks/fmnist.py`'s `evaluate`).",
        "",
        f"Machine: {results['machine']}, {results['cores']} CPU cores, {results['threads']} torch threads, no GPU; "
        f"1-minute load average {results['load_before']:.1f} before and {results['load_after']:.1f} after the runs "
        "(above the core count, other work shared the machine and the times are upper bounds).",
        "",
        *table(results),
        "",
        "Runs:",
        *[f"- **{name}**: {entry['description']}." for name, entry in results["runs"].items()],
    ]
    if any(entry["timed"] != "measured" for entry in results["runs"].values()):
        lines += ["", "\\* Run reused with `--reuse`: its time comes from the timestamps of its `metrics.jsonl`."]
    # The section below is filled in by hand (continued pretraining, benchmarked elsewhere): keep it.
    kept = "## Continued pretraining"
    previous = path.read_text() if path.exists() else ""
    lines += ["", previous[previous.index(kept):].rstrip() if kept in previous else kept]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=REPO / "outputs" / "fmnist_long",
                        help="the teacher's run directory (the long recipe of benchmarks/fmnist.py)")
    parser.add_argument("--steps", type=int, default=600, help=f"optimizer steps per student run (a multiple of {EPOCHS})")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in --out-dir, train the rest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every student run (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "distillation_benchmark")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "distillation.md")
    args = parser.parse_args(argv)
    if args.steps < EPOCHS or args.steps % EPOCHS:
        parser.error(f"--steps must be a positive multiple of {EPOCHS}, got {args.steps}")
    results = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(table(results)))
    write_report(results, args, args.report)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
