"""Weighted k-nearest-neighbour classification on frozen features, as DINO evaluates.

For a test feature ``q`` (L2-normalised) and the ``k`` training features ``x_i`` with the
highest cosine similarity ``s_i = <q, x_i>``, the score of class ``c`` is

    score(c) = sum_{i in top-k} exp(s_i / T) * [y_i == c]

and the prediction is the arg-max (top-5: the five best scores); ``knn_classify`` reports accuracies,
``knn_predict`` the predicted classes. The same functions work on raw pixels: flatten the images to vectors and
pass them as features.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, Iterator, Sequence, Tuple

import torch


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: features and labels must be torch tensors")
    if features.ndim != 2:
        raise ValueError(f"{name}_features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}_labels must be 1-D with one label per feature row: "
            f"features {tuple(features.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}_labels must be an integer tensor, got {labels.dtype}")
    if features.shape[0] == 0:
        raise ValueError(f"{name}_features is empty")


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> Dict[int, Dict[str, float]]:
    """Weighted cosine kNN accuracy for several ``k`` at once.

    Args:
        train_features: (N_train, D) features of the labelled "memory bank".
        train_labels: (N_train,) integer labels in [0, num_classes).
        test_features: (N_test, D) query features, same D.
        test_labels: (N_test,) integer labels.
        ks: neighbour counts to evaluate; a k larger than N_train is clamped to N_train
            (with a warning) and still reported under the requested k.
        temperature: T in exp(s / T).
        num_classes: number of classes; default max label + 1.
        batch_size: test rows per similarity chunk (memory is batch_size x N_train).

    Returns:
        ``{k: {"top1": percent, "top5": percent}}``.
    """
    _check_inputs(train_features, train_labels, "train")
    _check_inputs(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature dims differ: train {train_features.shape[1]} vs test {test_features.shape[1]}"
        )
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(train_labels.min()) < 0:
        raise ValueError("train_labels contain negative values (unlabelled samples cannot vote)")

    max_label = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"label {max_label} out of range for num_classes={num_classes}")

    n_train = train_features.shape[0]
    effective = {}
    for k in ks:
        effective[k] = min(k, n_train)
        if k > n_train:
            warnings.warn(f"kNN: k={k} > number of training samples ({n_train}); using k={n_train}")

    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    n_test = test_features.shape[0]
    for start, votes in _knn_votes(train_features, train_labels, test_features, effective, temperature,
                                   num_classes, batch_size):
        targets = test_labels[start : start + batch_size].to(device=train_features.device, dtype=torch.long)
        for k in ks:
            ranked = votes[k].topk(min(5, num_classes), dim=1).indices
            correct = ranked == targets[:, None]
            top1[k] += int(correct[:, 0].sum())
            top5[k] += int(correct.any(dim=1).sum())
    return {k: {"top1": 100.0 * top1[k] / n_test, "top5": 100.0 * top5[k] / n_test} for k in ks}


def _knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    effective: Dict[int, int],
    temperature: float,
    num_classes: int,
    batch_size: int,
) -> Iterator[Tuple[int, Dict[int, torch.Tensor]]]:
    """``(start, {k: (b, num_classes) scores})`` per chunk of ``batch_size`` queries; ``effective[k]`` is the
    number of neighbours that vote for ``k`` (k clamped to the memory size)."""
    device = train_features.device
    train = torch.nn.functional.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    k_max = max(effective.values())
    for start in range(0, test_features.shape[0], batch_size):
        queries = torch.nn.functional.normalize(
            test_features[start : start + batch_size].to(device=device, dtype=torch.float32), dim=1
        )
        similarity = queries @ train.T  # (b, N_train)
        # One sorted top-k_max serves every k: the top-k is its prefix.
        sims, idx = similarity.topk(k_max, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[idx]  # (b, k_max)
        weights = (sims / temperature).exp()
        votes = {}
        for k, kk in effective.items():
            votes[k] = torch.zeros(queries.shape[0], num_classes, device=device)
            votes[k].scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
        yield start, votes


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """The arg-max class of ``knn_classify``'s weighted vote for every test feature: (N_test,) long, for
    metrics other than accuracy (e.g. a confusion matrix). ``k`` is clamped to the memory size."""
    _check_inputs(train_features, train_labels, "train")
    if test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features must be (N, {train_features.shape[1]}), got {tuple(test_features.shape)}")
    if k < 1 or temperature <= 0 or batch_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, batch_size >= 1; got {k}, {temperature}, {batch_size}")
    if int(train_labels.min()) < 0:
        raise ValueError("train_labels contain negative values (unlabelled samples cannot vote)")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    effective = {k: min(k, train_features.shape[0])}
    chunks = [votes[k].argmax(dim=1) for _, votes in _knn_votes(
        train_features, train_labels, test_features, effective, temperature, num_classes, batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


def knn_metrics(results: Dict[int, Dict[str, float]], prefix: str = "knn") -> Dict[str, float]:
    """Flatten ``knn_classify`` output to metric names, e.g. ``{"knn/top1@20": 71.3, ...}``."""
    flat = {}
    for k, accs in results.items():
        for name, value in accs.items():
            flat[f"{prefix}/{name}@{k}"] = float(value)
    return flat


def flatten_images(images: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """Turn a batch of images (N, ...) into (N, prod(...)) float vectors for a pixel kNN baseline."""
    if not isinstance(images, torch.Tensor):
        images = torch.stack(list(images))
    return images.reshape(images.shape[0], -1).float()
