"""Label-efficient evaluation (MSN's protocol): a linear classifier on frozen features from a few labels.

Protocol (``lowshot_eval``):

1. Embed train and test once (``eval.linear.extract_linear_features``, the linear probe's cache: the last
   block's normalised CLS token and the average-pooled patch tokens).
2. For every setting (``k`` labelled images per class, or ``p`` percent of the labels) and every draw
   ``d = 0 .. draws-1``: a class-balanced subset of the train features (``labelled_subset``, seeded by
   ``(seed, setting, d)``), and on it the linear probe's multinomial L2 logistic regression
   (``eval.linear.fit_logistic_regression``)::

       min_{W,b}  C * sum_i CE(W x_i + b, y_i) + 1/2 ||W||^2

   on ``x = normalize(f - mean_train(f))``: features centred on the mean of ALL train features (no labels
   needed, so nothing leaks) and L2-normalised, which makes one ``C`` fit any backbone's feature scale.
3. Test top-1 of each draw; per setting the mean and the sample standard deviation over the draws
   (``ddof=1``; 0 for one draw).

Choosing the regularisation. The test set is never used. With one ``C`` (default ``DEFAULT_C = 1.0``, a fairly
strong regularisation, which suits a handful of examples: the solution is close to a nearest-class-mean
classifier) that ``C`` is used. With several ``Cs`` the ``C`` of a draw is chosen by stratified ``k``-fold
cross-validation on its own labelled subset, ``k = min(cv_folds, smallest class count)``; a subset with a single
image of some class cannot be cross-validated and uses ``default_C``. The returned rows say which (``C``,
``C_from``).

Subsets. ``k`` shots: ``k`` images of every class (all of a class's images when it has fewer, with a warning).
``p`` percent: ``max(1, round(p / 100 * n_c))`` images of each class ``c`` with ``n_c`` images, so the subset keeps
the class balance of the train set (ImageNet's 1% split holds 12-13 images of each class).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinoscale.data.seeding import derive_seed
from dinoscale.eval.linear import (
    build_linear_inputs,
    extract_linear_features,
    fit_logistic_regression,
    logreg_accuracy,
    resolve_logreg_backend,
)

logger = logging.getLogger(__name__)

DEFAULT_SHOTS = (1, 2, 5, 13)
DEFAULT_PERCENTS = (1.0,)
DEFAULT_C = 1.0


def setting_name(shots: Optional[int] = None, percent: Optional[float] = None) -> str:
    """``"1-shot"``, ``"13-shot"``, ``"1%"``: the key of a setting in the results."""
    if (shots is None) == (percent is None):
        raise ValueError("give exactly one of shots and percent")
    return f"{shots}-shot" if shots is not None else f"{percent:g}%"


def labelled_subset(
    labels: torch.Tensor, *, shots: Optional[int] = None, percent: Optional[float] = None, seed: int = 0
) -> torch.Tensor:
    """Sorted indices of a class-balanced random subset of ``labels`` (see the module docstring).

    The draw is a function of ``seed`` alone (a local generator): the same seed gives the same subset."""
    if (shots is None) == (percent is None):
        raise ValueError("give exactly one of shots and percent")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if percent is not None and not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels):  # sorted: the classes are drawn in a fixed order
        members = torch.nonzero(labels == c).flatten()
        n = shots if shots is not None else max(1, round(percent / 100 * members.numel()))
        if n > members.numel():
            logger.warning("class %d has %d images, fewer than %d: taking all of them", int(c), members.numel(), n)
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:n]])
    return torch.sort(torch.cat(chosen)).values


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _centre_normalise(x: torch.Tensor, mean: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float() - mean, dim=1).numpy()


def cross_validate_C(
    x: np.ndarray, y: np.ndarray, Cs: Sequence[float], *, folds: int = 5, seed: int = 0,
    max_iter: int = 1000, backend: str = "auto",
) -> Optional[List[Dict[str, float]]]:
    """Mean held-out top-1 of each ``C`` over stratified folds of ``(x, y)``: ``[{C, cv_top1}]``, or None when
    some class has a single sample (no fold could hold it out and still train on it)."""
    counts = np.unique(y, return_counts=True)[1]
    k = min(folds, int(counts.min()))
    if k < 2:
        return None
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):  # each class dealt round-robin over the folds in a random order
        members = rng.permutation(np.nonzero(y == c)[0])
        fold_of[members] = np.arange(len(members)) % k
    rows = []
    for C in Cs:
        scores = []
        for f in range(k):
            train, held = fold_of != f, fold_of == f
            predict, classes = fit_logistic_regression(x[train], y[train], C, max_iter=max_iter, backend=backend)
            scores.append(logreg_accuracy(predict, classes, x[held], y[held])[0])
        rows.append({"C": float(C), "cv_top1": float(np.mean(scores))})
    return rows


def lowshot_probe(
    train: Dict[str, Any],
    test: Dict[str, Any],
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    percents: Sequence[float] = DEFAULT_PERCENTS,
    draws: int = 3,
    avgpool: bool = False,
    Cs: Sequence[float] = (DEFAULT_C,),
    default_C: float = DEFAULT_C,
    cv_folds: int = 5,
    seed: int = 0,
    max_iter: int = 1000,
    backend: str = "auto",
) -> Dict[str, Any]:
    """Every low-shot setting on cached features (``extract_linear_features`` caches of train and test).

    Returns ``{"settings": {name: {"draws": [{draw, seed, num_labelled, C, C_from, test_top1, test_top5}],
    "mean_top1", "std_top1", "mean_top5", "std_top5", "num_labelled"}}, "num_train", "num_test", "draws",
    "avgpool", "Cs", "backend"}`` with ``name`` from :func:`setting_name`.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not Cs or min(Cs) <= 0 or default_C <= 0:
        raise ValueError(f"Cs and default_C must be positive, got {list(Cs)}, {default_C}")
    if not shots and not percents:
        raise ValueError("no setting: give shots and/or percents")
    for name, cache in (("train", train), ("test", test)):
        if "cls_blocks" not in cache or "labels" not in cache or cache["labels"].numel() == 0:
            raise ValueError(f"{name} feature cache needs 'cls_blocks' and non-empty 'labels'")
    if int(train["labels"].min()) < 0:
        raise ValueError("train labels contain negative values (unlabelled samples cannot be drawn)")
    backend = resolve_logreg_backend(backend)
    x_train_raw = build_linear_inputs(train, 1, avgpool)
    mean = x_train_raw.mean(dim=0)  # of every train image: no labels used
    x_train = _centre_normalise(x_train_raw, mean)
    x_test = _centre_normalise(build_linear_inputs(test, 1, avgpool), mean)
    y_train, y_test = train["labels"].cpu().numpy(), test["labels"].cpu().numpy()

    settings = [(setting_name(shots=k), dict(shots=int(k))) for k in shots]
    settings += [(setting_name(percent=p), dict(percent=float(p))) for p in percents]
    results: Dict[str, Any] = {}
    for name, spec in settings:
        rows = []
        for d in range(draws):
            draw_seed = derive_seed(seed, "lowshot", name, d)
            idx = labelled_subset(train["labels"], seed=draw_seed, **spec).numpy()
            x, y = x_train[idx], y_train[idx]
            C, C_from = float(Cs[0]), "fixed"
            if len(Cs) > 1:
                cv = cross_validate_C(x, y, Cs, folds=cv_folds, seed=draw_seed, max_iter=max_iter, backend=backend)
                if cv is None:
                    C, C_from = float(default_C), "default (a class has one labelled image: no cross-validation)"
                else:
                    C, C_from = max(cv, key=lambda r: r["cv_top1"])["C"], "cross-validation"
            predict, classes = fit_logistic_regression(x, y, C, max_iter=max_iter, backend=backend)
            top1, top5 = logreg_accuracy(predict, classes, x_test, y_test)
            rows.append({"draw": d, "seed": draw_seed, "num_labelled": int(len(idx)), "C": C, "C_from": C_from,
                         "test_top1": top1, "test_top5": top5})
        m1, s1 = mean_std([r["test_top1"] for r in rows])
        m5, s5 = mean_std([r["test_top5"] for r in rows])
        results[name] = {"draws": rows, "mean_top1": m1, "std_top1": s1, "mean_top5": m5, "std_top5": s5,
                         "num_labelled": rows[0]["num_labelled"]}
        logger.info("low-shot %s: top-1 %.2f +- %.2f over %d draws", name, m1, s1, draws)
    return {
        "settings": results,
        "num_train": int(len(y_train)),
        "num_test": int(len(y_test)),
        "draws": draws,
        "avgpool": avgpool,
        "Cs": [float(c) for c in Cs],
        "backend": backend,
    }


def lowshot_eval(
    model: torch.nn.Module,
    train_dataset: Dataset | DataLoader,
    test_dataset: Dataset | DataLoader,
    *,
    extract_batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[str | torch.device] = None,
    autocast_dtype: Any = None,
    transform: Optional[Callable] = None,
    progress: bool = True,
    **probe: Any,
) -> Dict[str, Any]:
    """End to end: cache the frozen features of ``model`` once, then :func:`lowshot_probe` (``probe``: its
    keyword arguments)."""
    extract = dict(n_last_blocks=1, batch_size=extract_batch_size, num_workers=num_workers, device=device,
                   autocast_dtype=autocast_dtype, transform=transform, progress=progress)
    train = extract_linear_features(model, train_dataset, **extract)
    test = extract_linear_features(model, test_dataset, **extract)
    result = lowshot_probe(train, test, **probe)
    result["num_skipped"] = int(train["num_skipped"] + test["num_skipped"])
    return result
