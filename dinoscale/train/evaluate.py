"""What training evaluates and exports: the kNN accuracy of a backbone, the exported weights of the evaluated
network (periodically and at the end), and the final kNN of the trained network against its random init.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from dinoscale import checkpoint, distributed
from dinoscale.data.open import open_dataset
from dinoscale.eval.extract import extract_features
from dinoscale.eval.knn import knn_classify
from dinoscale.eval.transforms import eval_transform
from dinoscale.methods.base import split_students
from dinoscale.models.factory import build_backbone
from dinoscale.train.build import Run
from dinoscale.train.continue_from import load_pretrained_backbone
from dinoscale.train.metrics import MetricLogger


def export_network(network: torch.nn.Module, export_dir: Path, name: str) -> None:
    """``NAME_backbone`` in the official DINOv2 layout (.pth + .safetensors), and ``NAME_heads`` beside it; a
    further student ``S`` of a distillation run as ``NAME_S_backbone`` and ``NAME_S_heads``."""
    full = checkpoint.full_state_dict(network)  # collective: every rank calls it
    if distributed.get_rank() == 0:
        for unit, state in split_students(full).items():
            stem = f"{name}_{unit}" if unit else name
            backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
            checkpoint.save_backbone(backbone, export_dir / f"{stem}_backbone")
            if heads:
                checkpoint.save_backbone(heads, export_dir / f"{stem}_heads")
    distributed.barrier()


def knn_features(cfg: DictConfig, backbone: torch.nn.Module, device: torch.device) -> tuple[dict, dict]:
    """``backbone``'s CLS features (and labels) of the configured kNN train and test sets, with the eval transform
    (``extract_features``'s dicts): what :func:`evaluate_knn` classifies."""
    ev = cfg.evaluation
    transform = eval_transform(ev.knn_image_size, backbone.patch_size)
    train_set = open_dataset(ev.knn_train_dataset, transform=transform, max_samples=ev.knn_max_train_samples)
    test_set = open_dataset(ev.knn_test_dataset, transform=transform, max_samples=ev.knn_max_test_samples)
    was_training = backbone.training
    backbone.eval()
    kw = dict(batch_size=256, num_workers=min(cfg.train.num_workers, 4), device=device, progress=False)
    train_feats = extract_features(backbone, train_set, **kw)
    test_feats = extract_features(backbone, test_set, **kw)
    backbone.train(was_training)
    return train_feats, test_feats


def knn_top1(cfg: DictConfig, train_feats: dict, test_feats: dict) -> dict[str, float]:
    """Weighted cosine kNN (``evaluation.knn_k``, ``knn_temperature``) of :func:`knn_features`' output."""
    ev = cfg.evaluation
    results = knn_classify(train_feats["cls"], train_feats["labels"], test_feats["cls"], test_feats["labels"],
                           ks=(ev.knn_k,), temperature=ev.knn_temperature)
    return {f"knn/top1@{k}": v["top1"] for k, v in results.items()} | {
        f"knn/top5@{k}": v["top5"] for k, v in results.items()}


def evaluate_knn(cfg: DictConfig, backbone: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Weighted cosine kNN of ``backbone``'s CLS features on the configured labeled datasets."""
    return knn_top1(cfg, *knn_features(cfg, backbone, device))


def evaluate_during_training(run: Run, step: int, metrics: MetricLogger) -> None:
    """kNN of the evaluated network logged as an ``eval`` event, and its weights exported to ``eval/step_N``:
    the weights each evaluation saw, loadable like any released backbone."""
    knn = evaluate_knn(run.cfg, run.eval_net["backbone"], run.device)
    metrics.log_event(step, {"type": "eval", **knn})
    export_network(run.eval_net, run.output_dir / "eval" / f"step_{step:09d}", run.eval_name)


def final_knn(run: Run, step: int) -> dict[str, float]:
    """kNN top-1 of the trained network (``teacher``) and of the very network training started from
    (``random_init``: same seed, same model config; ``pretrained`` instead when the run continued
    ``model.pretrained_weights``), appended to ``metrics.jsonl`` as a ``final_knn`` row."""
    cfg = run.cfg
    torch.manual_seed(cfg.train.seed)
    start = build_backbone(cfg.model, drop_path_rate=0.0)
    if cfg.model.pretrained_weights:
        load_pretrained_backbone(start, cfg.model)
    trained = evaluate_knn(cfg, run.eval_net["backbone"], run.device)
    untrained = evaluate_knn(cfg, start.to(run.device), run.device)
    top1 = f"knn/top1@{cfg.evaluation.knn_k}"
    reference = "pretrained" if cfg.model.pretrained_weights else "random_init"
    knn = {"teacher": trained[top1], reference: untrained[top1]}
    if distributed.get_rank() == 0:
        MetricLogger.append_jsonl(run.output_dir / "metrics.jsonl", {"type": "final_knn", "step": step, **knn})
    return knn
