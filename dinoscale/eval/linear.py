"""Linear probes on frozen features, as DINOv2 evaluates them.

Protocol (``linear_probe``):

1. Embed train / val / test once with the frozen backbone, caching the normalised CLS
   tokens of the last ``max(n_last_blocks_list)`` blocks and the average-pooled patch tokens
   of the last block.
2. For every setting in the grid ``n_last_blocks x avgpool x learning_rate`` build the input
   ``[cls_{L-n+1}, ..., cls_L] (+ mean(patch_L))`` and fit a linear head ``W x + b`` with
   softmax cross-entropy

       loss = -1/B sum_i log softmax(W x_i + b)[y_i]

   using SGD (momentum 0.9) and a cosine learning-rate schedule. All heads see the same
   mini-batches and train together in one pass over the cache (one summed loss; the heads
   share no parameters, so this equals training them separately).
3. Pick the head with the best validation top-1 (validation held out from train when no
   validation set is given), report the whole grid, and evaluate that head on test.

``logistic_regression_probe`` is the other DINOv2 protocol: multinomial L2-regularised
logistic regression on CLS features, the inverse regularisation strength C chosen on
validation, then refit on train + val. Objective (per C):

    min_{W,b}  C * sum_i CE(W x_i + b, y_i) + 1/2 ||W||^2
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dinoscale.data.seeding import derive_seed
from dinoscale.eval.extract import extract_outputs

logger = logging.getLogger(__name__)

# DINOv2's base grid, extended upwards because cached features need no warm-up.
DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5)
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 9))


# --------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------


def _intermediate_forward(n_last_blocks: int) -> Callable:
    def forward(model: torch.nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if hasattr(model, "get_intermediate_layers"):
            layers = model.get_intermediate_layers(images, n_last_blocks, return_class_token=True, norm=True)
            cls_blocks = torch.stack([cls for _, cls in layers], dim=1)  # (B, n, D), shallow -> deep
            patch_mean = layers[-1][0].mean(dim=1)
            return {"cls_blocks": cls_blocks, "patch_mean": patch_mean}
        if n_last_blocks != 1:
            raise ValueError(f"n_last_blocks={n_last_blocks} needs a model with get_intermediate_layers()")
        out = model.forward_features(images)
        return {"cls_blocks": out["x_norm_clstoken"][:, None], "patch_mean": out["x_norm_patchtokens"].mean(dim=1)}

    return forward


def extract_linear_features(
    model: torch.nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    *,
    n_last_blocks: int = 4,
    **options: Any,
) -> Dict[str, Any]:
    """Cache for the linear probe: ``cls_blocks`` (N, n_last_blocks, D) (shallow to deep),
    ``patch_mean`` (N, D) of the last block, ``labels`` (N,), plus the bookkeeping keys of
    ``extract_outputs`` (indices, num_skipped, skipped). ``options``: ``batch_size``, ``num_workers``,
    ``device``, ``autocast_dtype``, ``transform``, ``progress`` as in ``extract_outputs``."""
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    return extract_outputs(
        model, dataset_or_loader, _intermediate_forward(n_last_blocks), desc="linear features", **options
    )


def usable_block_counts(model: torch.nn.Module, n_last_blocks_list: Sequence[int]) -> List[int]:
    """The entries of ``n_last_blocks_list`` the model is deep enough for (others dropped with a warning)."""
    if not n_last_blocks_list or min(n_last_blocks_list) < 1:
        raise ValueError(f"n_last_blocks_list must hold positive block counts, got {list(n_last_blocks_list)}")
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    if depth is None:
        return sorted(set(n_last_blocks_list))
    usable = sorted({n for n in n_last_blocks_list if n <= depth})
    dropped = sorted({n for n in n_last_blocks_list if n > depth})
    if dropped:
        logger.warning("model has %d blocks: dropping n_last_blocks %s from the grid", depth, dropped)
    if not usable:
        raise ValueError(f"model has {depth} blocks, fewer than every requested n_last_blocks {dropped}")
    return usable


def build_linear_inputs(cache: Dict[str, torch.Tensor], n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """Concatenate the CLS tokens of the last ``n_last_blocks`` blocks (+ pooled patches)."""
    cls_blocks = cache["cls_blocks"]
    if cls_blocks.ndim == 2:  # plain (N, D) CLS features
        cls_blocks = cls_blocks[:, None]
    if n_last_blocks > cls_blocks.shape[1]:
        raise ValueError(f"n_last_blocks={n_last_blocks} but the cache holds only {cls_blocks.shape[1]} block(s)")
    parts = [cls_blocks[:, -n_last_blocks:].flatten(1)]
    if avgpool:
        if "patch_mean" not in cache:
            raise ValueError("avgpool=True needs 'patch_mean' in the feature cache")
        parts.append(cache["patch_mean"])
    return torch.cat(parts, dim=1).float()


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) holding out ``val_fraction`` of every class (at least one sample
    of each class with two or more samples)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        n_val = int(round(val_fraction * members.numel()))
        if members.numel() >= 2:
            n_val = min(max(n_val, 1), members.numel() - 1)
        else:
            n_val = 0
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(val_idx)).values


def _subset_cache(cache: Dict[str, Any], idx: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {k: cache[k][idx] for k in ("cls_blocks", "patch_mean", "labels") if k in cache}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    k = min(5, logits.shape[1])
    ranked = logits.topk(k, dim=1).indices
    correct = ranked == labels[:, None]
    n = labels.numel()
    return 100.0 * float(correct[:, 0].sum()) / n, 100.0 * float(correct.any(dim=1).sum()) / n


def _check_cache(cache: Dict[str, Any], name: str) -> None:
    if "cls_blocks" not in cache or "labels" not in cache:
        raise ValueError(f"{name} feature cache needs 'cls_blocks' and 'labels' (see extract_linear_features)")
    if cache["labels"].numel() == 0:
        raise ValueError(f"{name} feature cache is empty")
    if cache["labels"].shape[0] != cache["cls_blocks"].shape[0]:
        raise ValueError(f"{name}: {cache['cls_blocks'].shape[0]} features but {cache['labels'].shape[0]} labels")
    if int(cache["labels"].min()) < 0:
        raise ValueError(f"{name} labels contain negative values (unlabelled samples cannot train a probe)")


# --------------------------------------------------------------------------------------
# Linear heads trained together
# --------------------------------------------------------------------------------------


def train_linear_probes(
    train: Dict[str, Any],
    val: Optional[Dict[str, Any]] = None,
    test: Optional[Dict[str, Any]] = None,
    *,
    n_last_blocks_list: Sequence[int] = (1, 4),
    avgpool_list: Sequence[bool] = (False, True),
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    epochs: int = 10,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_classes: Optional[int] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Dict[str, Any]:
    """Fit the whole grid of linear heads on cached features and select on validation.

    Args:
        train, val, test: caches from ``extract_linear_features`` (``val``/``test`` optional;
            without ``val`` a stratified ``val_fraction`` of train is held out).
        n_last_blocks_list, avgpool_list, learning_rates: the grid.
        epochs, batch_size, momentum, weight_decay: SGD settings; the learning rate follows a
            cosine from its grid value to 0 over ``epochs * ceil(N / batch_size)`` steps.

    Returns:
        ``{"grid": [{n_last_blocks, avgpool, lr, val_top1, val_top5}, ...], "best": the best
        grid row, "test_top1"/"test_top5" (if test given), "num_classes", "num_train",
        "num_val", "best_head": the trained nn.Linear of the best setting, "heads": every head by
        (n_last_blocks, avgpool, lr)}``. Every learning rate of a setting starts from the same
        initialisation, seeded by ``seed`` and the setting.
    """
    _check_cache(train, "train")
    if val is None:
        train_idx, val_idx = stratified_split(train["labels"], val_fraction, seed)
        if val_idx.numel() == 0:
            raise ValueError("not enough training samples to hold out a validation split")
        train, val = _subset_cache(train, train_idx), _subset_cache(train, val_idx)
    _check_cache(val, "val")
    if test is not None:
        _check_cache(test, "test")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if not learning_rates or min(learning_rates) <= 0:
        raise ValueError(f"learning_rates must be positive, got {learning_rates}")
    max_label = max(int(c["labels"].max()) for c in (train, val, test) if c is not None)
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"label {max_label} out of range for num_classes={num_classes}")

    device = torch.device(device)
    settings = list(itertools.product(n_last_blocks_list, avgpool_list))
    train_inputs = {s: build_linear_inputs(train, *s).to(device) for s in settings}
    train_labels = train["labels"].to(device=device, dtype=torch.long)

    lrs = torch.tensor([float(lr) for lr in learning_rates], device=device)
    num_lrs = lrs.numel()
    # One (num_lrs, C, F) weight stack per feature setting: a single matmul trains every learning
    # rate of that setting at once. All learning rates of a setting start from the same init
    # (seeded by the setting), so the grid compares learning rates and nothing else.
    weights, biases = {}, {}
    for nb, ap in settings:
        g_init = torch.Generator().manual_seed(derive_seed(seed, "linear_head", nb, int(ap)))
        w = torch.empty(num_classes, train_inputs[(nb, ap)].shape[1])
        torch.nn.init.normal_(w, std=0.01, generator=g_init)
        weights[(nb, ap)] = w.expand(num_lrs, -1, -1).clone().to(device).requires_grad_(True)
        biases[(nb, ap)] = torch.zeros(num_lrs, num_classes, device=device, requires_grad=True)
    params = [p for s in settings for p in (weights[s], biases[s])]
    # Per-head learning rates as gradient scaling: with SGD(lr=schedule) and grads scaled by lr_h,
    # the momentum buffer of head h is lr_h times the unscaled one, so each head follows exactly
    # SGD with learning rate lr_h * schedule (weight decay is folded in before the scaling).
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=momentum)

    n = train_labels.numel()
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    g = torch.Generator().manual_seed(seed)  # batch order
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            targets = train_labels[idx]
            loss = 0.0
            for s in settings:
                w = weights[s].reshape(num_lrs * num_classes, -1)
                logits = torch.addmm(biases[s].reshape(-1), train_inputs[s][idx], w.T)  # (B, H * C)
                # Mean over the batch for each head, summed over heads.
                loss = loss + F.cross_entropy(
                    logits.reshape(-1, num_classes), targets.repeat_interleave(num_lrs), reduction="sum"
                ) / targets.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for s in settings:
                    if weight_decay:
                        weights[s].grad.add_(weights[s], alpha=weight_decay)
                    weights[s].grad.mul_(lrs[:, None, None])
                    biases[s].grad.mul_(lrs[:, None])
            optimizer.step()
            step += 1

    heads: Dict[Tuple[int, bool, float], torch.nn.Linear] = {}
    for s in settings:
        for h, lr in enumerate(learning_rates):
            head = torch.nn.Linear(weights[s].shape[2], num_classes, device=device)
            with torch.no_grad():
                head.weight.copy_(weights[s][h])
                head.bias.copy_(biases[s][h])
            heads[(s[0], s[1], float(lr))] = head.requires_grad_(False)

    grid: List[Dict[str, Any]] = []
    with torch.no_grad():
        val_inputs = {s: build_linear_inputs(val, *s).to(device) for s in settings}
        val_labels = val["labels"].to(device=device, dtype=torch.long)
        for (nb, ap, lr), head in heads.items():
            top1, top5 = _accuracy(head(val_inputs[(nb, ap)]), val_labels)
            grid.append({"n_last_blocks": nb, "avgpool": ap, "lr": lr, "val_top1": top1, "val_top5": top5})
        best = max(grid, key=lambda row: row["val_top1"])  # first in grid order on ties
        best_head = heads[(best["n_last_blocks"], best["avgpool"], best["lr"])]
        result: Dict[str, Any] = {
            "grid": grid,
            "best": dict(best),
            "num_classes": num_classes,
            "num_train": int(n),
            "num_val": int(val_labels.numel()),
            "best_head": best_head.cpu(),
            "heads": {key: head.cpu() for key, head in heads.items()},
        }
        if test is not None:
            test_inputs = build_linear_inputs(test, best["n_last_blocks"], best["avgpool"])
            top1, top5 = _accuracy(best_head(test_inputs), test["labels"].long())
            result["test_top1"], result["test_top5"] = top1, top5
            result["num_test"] = int(test["labels"].numel())
    logger.info(
        "linear probe: best %s (val top-1 %.2f)%s",
        {k: best[k] for k in ("n_last_blocks", "avgpool", "lr")},
        best["val_top1"],
        f", test top-1 {result['test_top1']:.2f}" if test is not None else "",
    )
    return result


def linear_probe(
    model: torch.nn.Module,
    train_dataset: Dataset | DataLoader,
    test_dataset: Optional[Dataset | DataLoader] = None,
    val_dataset: Optional[Dataset | DataLoader] = None,
    *,
    n_last_blocks_list: Sequence[int] = (1, 4),
    avgpool_list: Sequence[bool] = (False, True),
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    epochs: int = 10,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    extract_batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[str | torch.device] = None,
    autocast_dtype: Any = None,
    transform: Optional[Callable] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """End to end: cache frozen features of ``model`` on the datasets, then
    ``train_linear_probes`` (see there for the returned dict)."""
    n_last_blocks_list = usable_block_counts(model, n_last_blocks_list)
    n_max = max(n_last_blocks_list)
    extract = dict(
        n_last_blocks=n_max,
        batch_size=extract_batch_size,
        num_workers=num_workers,
        device=device,
        autocast_dtype=autocast_dtype,
        transform=transform,
        progress=progress,
    )
    train = extract_linear_features(model, train_dataset, **extract)
    val = extract_linear_features(model, val_dataset, **extract) if val_dataset is not None else None
    test = extract_linear_features(model, test_dataset, **extract) if test_dataset is not None else None
    probe_device = device if device is not None else next(iter(model.parameters()), torch.empty(0)).device
    result = train_linear_probes(
        train,
        val,
        test,
        n_last_blocks_list=n_last_blocks_list,
        avgpool_list=avgpool_list,
        learning_rates=learning_rates,
        epochs=epochs,
        batch_size=batch_size,
        val_fraction=val_fraction,
        seed=seed,
        device=probe_device,
    )
    result["num_skipped"] = sum(c["num_skipped"] for c in (train, val, test) if c is not None)
    return result


# --------------------------------------------------------------------------------------
# Logistic regression
# --------------------------------------------------------------------------------------


def _blas_threads(n: int):
    """Cap scipy's BLAS threads at torch's thread count: with torch's OpenMP pool loaded next to
    it, an uncapped OpenBLAS pool can spin against it and make L-BFGS many times slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # shipped with scikit-learn; without it, run as is
        return contextlib.nullcontext()
    return threadpool_limits(limits=max(1, n), user_api="blas")


def _fit_logreg_sklearn(x: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings(), _blas_threads(torch.get_num_threads()):
        # Non-convergence at extreme C is expected in a grid and judged by the val score.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    classes = clf.classes_

    def predict_logits(z: np.ndarray) -> torch.Tensor:
        scores = torch.from_numpy(clf.decision_function(z)).float()
        if scores.ndim == 1:  # binary: sklearn returns one margin for classes_[1]
            scores = torch.stack([-scores, scores], dim=1) / 2
        return scores

    return predict_logits, classes


def _fit_logreg_torch(x: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    """Multinomial logistic regression with L-BFGS; same objective as scikit-learn's."""
    xt = torch.from_numpy(x).double()
    classes = np.unique(y)
    yt = torch.from_numpy(np.searchsorted(classes, y)).long()
    n, d = xt.shape
    weight = torch.zeros(d, len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        # C * sum CE + 1/2 ||W||^2, divided by C * n to keep the scale O(1).
        loss = F.cross_entropy(xt @ weight + bias, yt) + weight.pow(2).sum() / (2 * C * n)
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def predict_logits(z: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(z).double() @ weight + bias).float()

    return predict_logits, classes


def resolve_logreg_backend(backend: str = "auto") -> str:
    """``"auto"`` -> ``"sklearn"`` when scikit-learn is installed, else ``"torch"``; other names checked."""
    if backend == "auto":
        try:
            import sklearn  # noqa: F401

            return "sklearn"
        except ImportError:
            return "torch"
    if backend not in ("sklearn", "torch"):
        raise ValueError(f"backend must be 'auto', 'sklearn' or 'torch', got {backend!r}")
    return backend


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, C: float, *, max_iter: int = 1000, backend: str = "auto"):
    """One multinomial L2 logistic regression (objective in the module docstring) on ``x`` (N, D), ``y`` (N,).

    Returns ``(predict_logits, classes)``: ``predict_logits(z)`` gives (M, len(classes)) scores of the sorted
    classes seen in ``y``. Score them with :func:`logreg_accuracy`."""
    fit = {"sklearn": _fit_logreg_sklearn, "torch": _fit_logreg_torch}[resolve_logreg_backend(backend)]
    return fit(x, y, float(C), max_iter)


def logreg_accuracy(predict_logits, classes: np.ndarray, x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    logits = predict_logits(x)
    # Map labels to the classifier's class positions; unseen classes can never be right.
    positions = np.searchsorted(classes, y)
    positions = np.clip(positions, 0, len(classes) - 1)
    known = classes[positions] == y
    labels = torch.from_numpy(np.where(known, positions, -1)).long()
    return _accuracy(logits, labels)


def logistic_regression_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: Optional[torch.Tensor] = None,
    test_labels: Optional[torch.Tensor] = None,
    *,
    val_features: Optional[torch.Tensor] = None,
    val_labels: Optional[torch.Tensor] = None,
    Cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    refit: bool = True,
    backend: str = "auto",
    seed: int = 0,
) -> Dict[str, Any]:
    """Logistic regression on (N, D) features with C chosen on validation.

    Args:
        backend: "sklearn" (``LogisticRegression``, lbfgs), "torch" (L-BFGS, float64) or
            "auto" (scikit-learn when installed).
        refit: after choosing C, refit on train + val before testing (DINOv2 does).

    Returns:
        ``{"grid": [{C, val_top1, val_top5}], "best": row, "test_top1", "test_top5" (with test),
        "num_train", "num_val", "backend"}``.
    """
    if train_features.ndim != 2:
        raise ValueError(f"train_features must be (N, D), got {tuple(train_features.shape)}")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError("train_labels must be (N,) matching train_features")
    if int(train_labels.min()) < 0:
        raise ValueError("train_labels contain negative values (unlabelled samples cannot train a probe)")
    if (test_features is None) != (test_labels is None) or (val_features is None) != (val_labels is None):
        raise ValueError("give features and labels together (test_features/test_labels, val_features/val_labels)")
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be positive, got {Cs}")
    backend = resolve_logreg_backend(backend)
    fit = {"sklearn": _fit_logreg_sklearn, "torch": _fit_logreg_torch}[backend]

    if val_features is None:
        train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
        if val_idx.numel() == 0:
            raise ValueError("not enough training samples to hold out a validation split")
        val_features, val_labels = train_features[val_idx], train_labels[val_idx]
        train_features, train_labels = train_features[train_idx], train_labels[train_idx]
    as_np = lambda t: t.detach().cpu().float().numpy()  # noqa: E731
    x_tr, y_tr = as_np(train_features), train_labels.cpu().numpy()
    x_va, y_va = as_np(val_features), val_labels.cpu().numpy()

    grid = []
    for C in Cs:
        predict, classes = fit(x_tr, y_tr, float(C), max_iter)
        top1, top5 = logreg_accuracy(predict, classes, x_va, y_va)
        grid.append({"C": float(C), "val_top1": top1, "val_top5": top5})
    best = max(grid, key=lambda row: row["val_top1"])
    result: Dict[str, Any] = {
        "grid": grid,
        "best": dict(best),
        "num_train": int(len(y_tr)),
        "num_val": int(len(y_va)),
        "backend": backend,
    }
    if test_features is not None:
        if refit:
            x_fit, y_fit = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
        else:
            x_fit, y_fit = x_tr, y_tr
        predict, classes = fit(x_fit, y_fit, best["C"], max_iter)
        top1, top5 = logreg_accuracy(predict, classes, as_np(test_features), test_labels.cpu().numpy())
        result["test_top1"], result["test_top5"] = top1, top5
        result["num_test"] = int(test_labels.numel())
    return result
