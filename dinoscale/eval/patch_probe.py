"""A patch-level (segmentation-style) probe for Fashion-MNIST: which garment each patch shows, or background.

Labels (``patch_labels``). An image of class ``c`` (0-9) goes through the evaluation transform at the probe's size
``S`` (default 64 px, ``crop_ratio`` 1: the whole image, resized bicubic) and is cut into the backbone's patch grid
(``S / p`` x ``S / p``: 8 x 8 at 64 px with 8 px patches). A pixel is foreground when its intensity in [0, 1] (the
transformed image before normalisation) is above ``threshold``; a patch is labelled ``c + 1`` when at least
``min_fraction`` (half) of its pixels are foreground, else ``0`` (background): an 11-way label per patch.

Probes. The frozen backbone's final-norm patch tokens (``x_norm_patchtokens``), one row per patch:

* ``fit_patch_probe``: the multinomial L2 logistic regression of ``dinoscale.eval.linear``
  (``fit_logistic_regression``) on the patches of the training images; with several ``Cs`` the one scoring the best
  mIoU on held-out training *images* (patches of one image never straddle the split) is refit on all of them;
* ``patch_knn``: weighted cosine kNN (``dinoscale.eval.knn.knn_predict``) from each test patch to the training
  patches.

Scores (``segmentation_scores``), from the confusion matrix ``M`` (rows: true label, columns: predicted) summed
over every test patch::

    IoU_l = M[l, l] / (sum_j M[l, j] + sum_i M[i, l] - M[l, l])
    mIoU  = mean of IoU_l over the labels that occur in the targets or the predictions
    patch accuracy = trace(M) / sum(M)
    foreground / background IoU: IoU of label > 0 / label 0 on the 2 x 2 matrix that ignores the class

``bootstrap_miou``: the mIoU of resamples of the test images (the same resamples for every backbone scored on the
same images, so differences between backbones get a paired spread).

``patch_similarity_stats``: the mean cosine similarity of two distinct patch tokens of one image, of all pairs and
of foreground-foreground, background-background and foreground-background pairs, and of the CLS token with the
patch tokens of its image: patch tokens that lose their locality (what DINOv3's Gram anchoring counters: over long
training they grow alike, and alike to the CLS token) push all of them towards 1; a foreground - background
separation shows as ``fg_fg`` and ``bg_bg`` above ``fg_bg``.

What it measures, and its limits: a patch label is right only when the token says *that* it lies on the garment
and *which* garment the whole image shows, so a high mIoU needs patch tokens that carry the object's class (the
context), not only local texture. But the masks are thresholded intensities, not annotations (dark parts of a
garment count as background), Fashion-MNIST shows one centred object on a black background (the where-part is
almost thresholding; the class part is the hard one and dominates the mIoU: 10 of its 11 labels), the grid is
coarse (8 x 8 at 64 px, 4 x 4 at 32 px; a patch on an edge gets its majority), 64 px is the 28 px image upsampled
(nothing new to see), and it is a linear read-out of frozen features on a few thousand images, not a trained
segmenter: compare backbones with it, do not read it as segmentation quality.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.eval.extract import extract_outputs
from dinoscale.eval.knn import knn_predict
from dinoscale.eval.linear import fit_logistic_regression
from dinoscale.eval.transforms import eval_transform

NUM_CLASSES = 10  # Fashion-MNIST; the patch labels are 0 (background) and 1..NUM_CLASSES
DEFAULT_THRESHOLD = 0.1  # intensity in [0, 1]: Fashion-MNIST's background is 0, about half the pixels are above


def foreground_fraction(images: torch.Tensor, patch_size: int, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """The fraction of each patch's pixels above ``threshold``: (N, H, W) intensities in [0, 1] -> (N, H/p, W/p)."""
    if images.ndim != 3 or images.shape[1] % patch_size or images.shape[2] % patch_size:
        raise ValueError(f"expected (N, H, W) with H, W multiples of {patch_size}, got {tuple(images.shape)}")
    return F.avg_pool2d((images > threshold).float()[:, None], patch_size)[:, 0]


def patch_labels(fraction: torch.Tensor, classes: torch.Tensor, min_fraction: float = 0.5) -> torch.Tensor:
    """(N, h, w) long: ``classes[n] + 1`` where ``fraction >= min_fraction`` (foreground), else 0 (background)."""
    if classes.shape != fraction.shape[:1]:
        raise ValueError(f"one class per image: fraction {tuple(fraction.shape)}, classes {tuple(classes.shape)}")
    if int(classes.min()) < 0:
        raise ValueError("image classes must be >= 0")
    labels = classes.long().view(-1, 1, 1) + 1
    return torch.where(fraction >= min_fraction, labels, torch.zeros_like(labels))


def intensity(images: torch.Tensor) -> torch.Tensor:
    """The first channel of normalised (N, 3, H, W) images back in [0, 1] (gray images: all channels agree)."""
    return images[:, 0].float() * IMAGENET_STD[0] + IMAGENET_MEAN[0]


def extract_patch_data(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    image_size: int = 64,
    crop_ratio: float = 1.0,
    threshold: float = DEFAULT_THRESHOLD,
    min_fraction: float = 0.5,
    **options: Any,
) -> Dict[str, torch.Tensor]:
    """Frozen tokens and patch labels of ``dataset`` ((image, class) samples) at ``image_size``.

    Returns ``{"cls": (N, D), "patches": (N, h*w, D), "labels": (N, h*w) patch labels, "classes": (N,),
    "grid": (h, w)}`` in dataset order. ``options``: ``batch_size``, ``num_workers``, ``device``,
    ``autocast_dtype``, ``progress`` as in ``dinoscale.eval.extract.extract_outputs``.
    """
    p = model.patch_size

    def forward(net: torch.nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = net.forward_features(images)
        # The mask comes from the very pixels the backbone sees (after resize and crop).
        fraction = foreground_fraction(intensity(images), p, threshold)
        return {"cls": out["x_norm_clstoken"], "patches": out["x_norm_patchtokens"], "fraction": fraction}

    options.setdefault("progress", False)
    out = extract_outputs(model, dataset, forward, transform=eval_transform(image_size, p, crop_ratio=crop_ratio),
                          desc="patch tokens", **options)
    if out["num_skipped"]:
        raise ValueError(f"{out['num_skipped']} images could not be read: {out['skipped'][:3]}")
    grid = tuple(out["fraction"].shape[1:])
    labels = patch_labels(out["fraction"], out["labels"], min_fraction).flatten(1)
    return {"cls": out["cls"], "patches": out["patches"], "labels": labels, "classes": out["labels"], "grid": grid}


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts; ``M[t, p]``: patches of true label ``t`` predicted ``p``."""
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    if target.shape != pred.shape:
        raise ValueError(f"{target.numel()} targets but {pred.numel()} predictions")
    if target.numel() and (min(int(target.min()), int(pred.min())) < 0
                           or max(int(target.max()), int(pred.max())) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels})")
    return torch.bincount(target * num_labels + pred, minlength=num_labels**2).reshape(num_labels, num_labels)


def _iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-label IoU (NaN for a label in neither the targets nor the predictions)."""
    m = confusion.double()
    tp = m.diagonal()
    union = m.sum(dim=1) + m.sum(dim=0) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def segmentation_scores(confusion: torch.Tensor) -> Dict[str, Any]:
    """mIoU, per-label IoU, patch accuracy, foreground and background IoU of a confusion matrix whose label 0 is
    the background (formulas in the module docstring). Scores are fractions in [0, 1]."""
    iou = _iou(confusion)
    m = confusion.double()
    binary = torch.stack([torch.stack([m[0, 0], m[0, 1:].sum()]), torch.stack([m[1:, 0].sum(), m[1:, 1:].sum()])])
    bg, fg = _iou(binary).tolist()
    return {
        "miou": float(iou.nanmean()),
        "iou": iou.tolist(),
        "patch_accuracy": float(m.diagonal().sum() / m.sum().clamp_min(1)),
        "foreground_iou": fg,
        "background_iou": bg,
        "num_patches": int(m.sum()),
    }


def image_confusions(target: torch.Tensor, pred: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(N, num_labels, num_labels): the confusion matrix of each image's (N, P) patches; their sum over images is
    ``confusion_matrix`` of all patches."""
    if target.shape != pred.shape or target.ndim != 2:
        raise ValueError(f"expected (N, P) targets and predictions, got {tuple(target.shape)}, {tuple(pred.shape)}")
    n = target.shape[0]
    image = torch.arange(n)[:, None].expand_as(target)
    flat = (image * num_labels + target.long()) * num_labels + pred.long()
    return torch.bincount(flat.reshape(-1), minlength=n * num_labels**2).reshape(n, num_labels, num_labels)


def bootstrap_miou(confusions: torch.Tensor, *, samples: int = 200, seed: int = 0) -> list[float]:
    """The mIoU of ``samples`` resamples (with replacement) of the images of ``image_confusions``. The draws depend
    only on ``seed`` and the number of images, so two backbones scored on the same test images get the same
    resamples: the spread of their difference is a paired one."""
    g = torch.Generator().manual_seed(seed)
    n = confusions.shape[0]
    out = []
    for _ in range(samples):
        idx = torch.randint(0, n, (n,), generator=g)
        out.append(float(_iou(confusions[idx].sum(dim=0)).nanmean()))
    return out


def _rows(patches: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if patches.ndim != 3 or labels.shape != patches.shape[:2]:
        raise ValueError(f"expected patches (N, P, D) and labels (N, P), got {tuple(patches.shape)} and "
                         f"{tuple(labels.shape)}")
    return patches.reshape(-1, patches.shape[-1]).float(), labels.reshape(-1).long()


def fit_patch_probe(
    train_patches: torch.Tensor,
    train_labels: torch.Tensor,
    test_patches: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_labels: int = NUM_CLASSES + 1,
    Cs: Sequence[float] = (1.0,),
    val_fraction: float = 0.2,
    max_iter: int = 200,
    backend: str = "auto",
    seed: int = 0,
    bootstrap: int = 0,
) -> Dict[str, Any]:
    """The logistic-regression patch probe: fit on the (N, P, D) training patches, score the test patches.

    With several ``Cs``, each is fitted on the training images but a seeded ``val_fraction`` of them and scored
    (mIoU) on those; the best is refit on all training images. Returns ``segmentation_scores`` of the test patches
    plus ``C``, ``grid`` (``[{C, val_miou}]``, empty with one C), ``num_train_patches``; with ``bootstrap`` > 0
    also ``miou_bootstrap``: ``bootstrap_miou`` over the test images (the spread of the test sample, not of the fit).
    """
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be positive, got {list(Cs)}")
    x_test, y_test = _rows(test_patches, test_labels)
    grid = []
    if len(Cs) > 1:
        n = train_patches.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = int(round(val_fraction * n))
        if not 0 < n_val < n:
            raise ValueError(f"val_fraction {val_fraction} of {n} training images leaves no validation or fit split")
        val, fit = order[:n_val], order[n_val:]
        x_fit, y_fit = _rows(train_patches[fit], train_labels[fit])
        x_val, y_val = _rows(train_patches[val], train_labels[val])
        for C in Cs:
            pred = _predict(*fit_logistic_regression(x_fit.numpy(), y_fit.numpy(), C, max_iter=max_iter,
                                                     backend=backend), x_val)
            grid.append({"C": float(C), "val_miou": segmentation_scores(confusion_matrix(y_val, pred, num_labels))[
                "miou"]})
        best_C = max(grid, key=lambda row: row["val_miou"])["C"]  # the first of equals
    else:
        best_C = float(Cs[0])
    x_train, y_train = _rows(train_patches, train_labels)
    predict = fit_logistic_regression(x_train.numpy(), y_train.numpy(), best_C, max_iter=max_iter, backend=backend)
    pred = _predict(*predict, x_test)
    scores = segmentation_scores(confusion_matrix(y_test, pred, num_labels))
    out = {**scores, "C": best_C, "grid": grid, "num_train_patches": int(y_train.numel())}
    if bootstrap:
        per_image = image_confusions(test_labels, pred.reshape(test_labels.shape), num_labels)
        out["miou_bootstrap"] = bootstrap_miou(per_image, samples=bootstrap, seed=seed)
    return out


def _predict(predict_logits, classes: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Labels from ``fit_logistic_regression``'s scores of its sorted seen classes."""
    return torch.from_numpy(classes)[predict_logits(x.numpy()).argmax(dim=1)].long()


def patch_knn(
    train_patches: torch.Tensor,
    train_labels: torch.Tensor,
    test_patches: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_labels: int = NUM_CLASSES + 1,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Dict[str, Any]:
    """Weighted cosine kNN from every test patch to every training patch; ``segmentation_scores`` of the result."""
    x_train, y_train = _rows(train_patches, train_labels)
    x_test, y_test = _rows(test_patches, test_labels)
    pred = knn_predict(x_train, y_train, x_test, k=k, temperature=temperature, num_classes=num_labels,
                       batch_size=batch_size)
    return {**segmentation_scores(confusion_matrix(y_test, pred, num_labels)), "k": k}


def patch_similarity_stats(
    patches: torch.Tensor, labels: Optional[torch.Tensor] = None, cls: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """Mean cosine similarities within each image, averaged over the pairs of all images.

    ``patches`` (N, P, D): ``all`` (two distinct patch tokens); with (N, P) patch ``labels`` (0: background)
    ``fg_fg``, ``bg_bg`` and ``fg_bg`` pairs. With the (N, D) ``cls`` tokens: ``cls_patch`` (the CLS token and a
    patch token of its image), and with labels ``cls_fg`` and ``cls_bg``. NaN where no image has such a pair.
    """
    if patches.ndim != 3 or patches.shape[1] < 2:
        raise ValueError(f"expected (N, P >= 2, D) patch tokens, got {tuple(patches.shape)}")
    z = F.normalize(patches.float(), dim=-1)
    sim = z @ z.transpose(1, 2)  # (N, P, P)
    distinct = ~torch.eye(patches.shape[1], dtype=torch.bool)
    pairs = {"all": (sim, distinct.expand_as(sim))}
    fg = None
    if labels is not None:
        if labels.shape != patches.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match patches {tuple(patches.shape)}")
        fg = labels > 0
        pairs["fg_fg"] = (sim, fg[:, :, None] & fg[:, None, :] & distinct)
        pairs["bg_bg"] = (sim, ~fg[:, :, None] & ~fg[:, None, :] & distinct)
        pairs["fg_bg"] = (sim, fg[:, :, None] & ~fg[:, None, :])
    if cls is not None:
        if cls.shape != (patches.shape[0], patches.shape[2]):
            raise ValueError(f"cls {tuple(cls.shape)} does not match patches {tuple(patches.shape)}")
        to_cls = (z @ F.normalize(cls.float(), dim=-1)[:, :, None])[..., 0]  # (N, P)
        pairs["cls_patch"] = (to_cls, torch.ones_like(to_cls, dtype=torch.bool))
        if fg is not None:
            pairs["cls_fg"], pairs["cls_bg"] = (to_cls, fg), (to_cls, ~fg)
    return {name: float(values[mask].mean()) if mask.any() else float("nan") for name, (values, mask) in pairs.items()}
