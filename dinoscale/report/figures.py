"""The report's pictures as PNG ``data:`` URIs: metric charts from ``metrics.jsonl`` rows, and attention maps and
patch-feature PCA of a backbone on a few images of the run's own dataset.

Charts draw with ``dinoscale.viz.curves``; pictures with ``dinoscale.viz.attention`` and ``dinoscale.viz.pca``.
A chart function returns None when the rows hold nothing to draw, so the page can say so instead.
"""

from __future__ import annotations

import base64
import io
from typing import Any, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from dinoscale.data.open import open_dataset  # noqa: E402
from dinoscale.eval.transforms import to_uint8_or_float_chw  # noqa: E402
from dinoscale.viz.attention import attention_maps, load_images, normalise01, upsample_maps  # noqa: E402
from dinoscale.viz.curves import (  # noqa: E402
    LR_KEYS,
    is_loss_key,
    knn_series,
    plot_knn,
    plot_series,
    rows_of_type,
    series,
)
from dinoscale.viz.pca import pca_pictures, upsample_grid  # noqa: E402

CHART_WIDTH_IN = 11.0  # 1100 px at DPI: the page's content width
DPI = 100
MAX_HEADS_SHOWN = 6
SCHEDULE_PANELS = (
    ("learning rate", LR_KEYS),
    ("weight decay", ("wd",)),
    ("teacher momentum", ("momentum",)),
    ("teacher temperature", ("teacher_temp",)),
)


def png_data_uri(fig: Figure) -> str:
    """The figure as an inline ``data:image/png;base64,...`` URI (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------


def _panels(n: int, height_in: float = 2.8):
    fig, axes = plt.subplots(1, n, figsize=(CHART_WIDTH_IN, height_in), squeeze=False)
    return fig, list(axes[0])


def _finish(fig: Figure, axes) -> Figure:
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def loss_chart(rows: Sequence[dict]) -> Optional[Figure]:
    """The total loss and each term over steps (log scale when all positive)."""
    losses = series(rows_of_type(rows, None), is_loss_key)
    if not losses:
        return None
    fig, axes = _panels(1, 3.4)
    plot_series(axes[0], losses, ylabel="loss", log_scale=True)
    return _finish(fig, axes)


def schedules_chart(rows: Sequence[dict]) -> Optional[Figure]:
    """lr, weight decay, teacher momentum and temperature, one panel each."""
    train_rows = rows_of_type(rows, None)
    data = [(name, series(train_rows, lambda k, keys=keys: k in keys)) for name, keys in SCHEDULE_PANELS]
    if not any(d for _, d in data):
        return None
    fig, axes = _panels(len(data), 2.6)
    for ax, (name, d) in zip(axes, data):
        plot_series(ax, d, ylabel=name)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    return _finish(fig, axes)


def knn_chart(rows: Sequence[dict]) -> Optional[Figure]:
    """Periodic kNN accuracies (``eval`` rows) and the final teacher / random-init top-1 as stars."""
    knn, final = knn_series(rows)
    if not knn and not final:
        return None
    fig, axes = _panels(1, 3.0)
    plot_knn(axes[0], knn, final)
    axes[0].set_xlim(left=0)  # where in training: a lone final kNN is not centred on a few steps around it
    return _finish(fig, axes)


def throughput_chart(rows: Sequence[dict]) -> Optional[Figure]:
    """Images per second, and the model FLOP utilisation (%) and TFLOP/s when the run logged them."""
    train_rows = rows_of_type(rows, None)
    speed = series(train_rows, lambda k: k == "images_per_s")
    if not speed:
        return None
    mfu = series(train_rows, lambda k: k == "perf/mfu")
    tflops = series(train_rows, lambda k: k == "perf/tflops_per_s")
    fig, axes = _panels(3 if mfu else 1, 2.6)
    plot_series(axes[0], speed, ylabel="images / s")
    if mfu:
        plot_series(axes[1], {"MFU (%)": mfu["perf/mfu"]}, ylabel="MFU (%)", scale=100.0)
        plot_series(axes[2], tflops, ylabel="TFLOP/s per rank")
    return _finish(fig, axes)


def stability_chart(rows: Sequence[dict]) -> Optional[Figure]:
    """Gradient norm over steps, with every skipped (non-finite) step marked by a red line."""
    grad = series(rows_of_type(rows, None), lambda k: k == "grad_norm")
    skipped = [r["step"] for r in rows_of_type(rows, "skipped_step")]
    if not grad and not skipped:
        return None
    fig, axes = _panels(1, 2.6)
    plot_series(axes[0], grad, ylabel="gradient norm (before clipping)")
    for i, step in enumerate(skipped):
        axes[0].axvline(step, color="red", alpha=0.6, linewidth=1, label="skipped step" if i == 0 else None)
    if skipped:
        axes[0].legend(fontsize=7, loc="best")
    return _finish(fig, axes)


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------


def _local_spec(spec: Any) -> bool:
    """A dataset spec the report may open: no pipe: commands or downloads just to draw pictures."""
    return isinstance(spec, str) and bool(spec) and not spec.startswith(("pipe:", "http://", "https://"))


def _one_per_label(dataset, n: int, scan: int) -> List[Tuple[str, torch.Tensor]]:
    """The first image of each label among the first ``scan`` samples, up to ``n`` (any image once labels
    repeat and fewer than ``n`` labels were found)."""
    classes = getattr(dataset, "classes", None)
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        samples = (dataset[i] for i in range(min(len(dataset), scan)))
    else:
        samples = (item for _, item in zip(range(scan), dataset))
    picked, extra, seen = [], [], set()
    for index, (image, label) in enumerate(samples):
        name = classes[label] if classes is not None and 0 <= label < len(classes) else f"#{index} (label {label})"
        if label not in seen:
            seen.add(label)
            picked.append((name, image))
        elif len(extra) < n:
            extra.append((name, image))
        if len(picked) == n:
            break
    return (picked + extra)[:n]


def sample_images(config: DictConfig, n: int, *, scan: int = 1000) -> Tuple[List[Tuple[str, Any]], str, List[str]]:
    """(``n`` (name, image) pairs, where they come from, why earlier sources were passed over).

    Tried in order: the kNN test set, the kNN train set, the training set (one image per class where the
    dataset has labels), then scikit-image's sample photos."""
    notes: List[str] = []
    specs = [OmegaConf.select(config, key, default=None)
             for key in ("evaluation.knn_test_dataset", "evaluation.knn_train_dataset", "train.dataset")]
    for spec in dict.fromkeys(s for s in specs if _local_spec(s)):
        try:
            images = _one_per_label(open_dataset(spec, transform=to_uint8_or_float_chw), n, scan)
        except Exception as exc:  # any unreadable source: say why, and try the next one
            notes.append(f"{spec}: {type(exc).__name__}: {exc}")
            continue
        if images:
            return images, spec, notes
        notes.append(f"{spec}: no images")
    return load_images(["skimage"])[:n], "scikit-image sample photos", notes


def pictures_chart(model: torch.nn.Module, images: Sequence[Tuple[str, Any]], image_size: Optional[int]) -> Figure:
    """One row per image: the image, its CLS attention (mean over heads, over the image), each head's map
    (up to ``MAX_HEADS_SHOWN``), the first PCA component of the patch features and components 2-4 as RGB on
    the foreground (one PCA fitted over all images)."""
    p = model.patch_size
    prepared, pca = pca_pictures(model, [img for _, img in images], image_size=image_size)
    heads = min(int(getattr(model, "num_heads", MAX_HEADS_SHOWN)), MAX_HEADS_SHOWN)
    titles = ["image", "attention (mean)", *[f"head {k}" for k in range(heads)], "PCA 1st comp.", "PCA 2-4 (RGB)"]
    fig, axes = plt.subplots(len(images), len(titles), figsize=(1.35 * len(titles), 1.45 * len(images)),
                             squeeze=False)
    for row, ((name, _), (x, display), res) in enumerate(zip(images, prepared, pca)):
        maps = upsample_maps(attention_maps(model, x), p).numpy()
        pictures = [
            (display, None),
            (normalise01(maps.mean(axis=0)), "inferno"),
            *[(normalise01(m), "inferno") for m in maps[:heads]],
            (upsample_grid(res["first"], p), "viridis"),
            (upsample_grid(res["rgb"], p).clip(0.0, 1.0), None),
        ]
        for col, (ax, (picture, cmap)) in enumerate(zip(axes[row], pictures)):
            if col == 1:  # the mean map over the image it belongs to
                ax.imshow(display, interpolation="nearest")
                ax.imshow(picture, cmap=cmap, alpha=0.6, vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return fig
