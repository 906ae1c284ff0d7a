"""PCA of patch features, as the DINOv2 paper shows them.

1. Collect the normalised patch tokens of all images and fit one PCA on them jointly
   (mean-centred, top components by SVD), so colours mean the same thing across images.
2. The first component separates foreground from background: its projection is min-max
   scaled to [0, 1] over all patches and thresholded (``threshold``, default 0.5). Its sign
   is arbitrary, so by default it is flipped when the border of the images (usually
   background) scores higher than the centre.
3. Components 2-4 are min-max scaled per channel over the foreground patches of all images
   and shown as RGB; background patches are black.

``pca_rgb`` is the plain variant: components 1-3 as RGB over all patches, no foreground split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dinoscale.viz.attention import prepare_image  # noqa: E402

logger = logging.getLogger(__name__)


@torch.inference_mode()
def patch_features(model: torch.nn.Module, images: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Normalised patch tokens (h, w, D) of each (3, H, W) image (sizes may differ)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p = model.patch_size
    out = []
    try:
        for x in images:
            if x.ndim != 3 or x.shape[1] % p or x.shape[2] % p:
                raise ValueError(f"expected (3, H, W) with H, W multiples of {p}, got {tuple(x.shape)}")
            tokens = model.forward_features(x[None].to(device))["x_norm_patchtokens"][0]
            out.append(tokens.float().cpu().reshape(x.shape[1] // p, x.shape[2] // p, -1))
    finally:
        model.train(was_training)
    return out


def fit_pca(features: torch.Tensor, n_components: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (k, D)) of (M, D) samples; rows of ``components`` are orthonormal."""
    if features.ndim != 2:
        raise ValueError(f"features must be (M, D), got {tuple(features.shape)}")
    k = min(n_components, *features.shape)
    mean = features.mean(dim=0)
    # Full SVD of the centred data: exact and cheap at the sizes pictures use (M ~ 10^3-10^4 patches).
    _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
    return mean, vh[:k]


def _border_mask(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def pca_foreground_rgb(
    features: Sequence[torch.Tensor],
    *,
    threshold: float = 0.5,
    sign: str = "auto",
) -> List[Dict[str, torch.Tensor]]:
    """DINOv2's PCA picture from patch features (list of (h, w, D), one per image).

    Args:
        threshold: foreground = first component (min-max scaled to [0, 1] over all images) above it.
        sign: "auto" (flip the first component when the image borders score higher than the
            interior), "keep" or "flip".

    Returns per image ``{"first": (h, w) scaled first component, "foreground": (h, w) bool,
    "rgb": (h, w, 3) in [0, 1]}``.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if sign not in ("auto", "keep", "flip"):
        raise ValueError(f"sign must be 'auto', 'keep' or 'flip', got {sign!r}")
    if not features:
        raise ValueError("no images given")
    shapes = [f.shape[:2] for f in features]
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    mean, comps = fit_pca(flat, 4)
    proj = (flat - mean) @ comps.T  # (M, k)

    first = proj[:, 0]
    first = (first - first.min()) / (first.max() - first.min()).clamp_min(1e-12)
    per_image_first = list(torch.split(first, [h * w for h, w in shapes]))
    if sign == "flip":
        flip = True
    elif sign == "keep":
        flip = False
    else:
        border = torch.cat([f.reshape(h, w)[_border_mask(h, w)] for f, (h, w) in zip(per_image_first, shapes)])
        interior = torch.cat([f.reshape(h, w)[~_border_mask(h, w)] for f, (h, w) in zip(per_image_first, shapes)])
        flip = interior.numel() > 0 and bool(border.mean() > interior.mean())
    if flip:
        first = 1.0 - first
    foreground = first > threshold

    rgb = torch.zeros(flat.shape[0], 3)
    n_rgb = min(3, proj.shape[1] - 1)
    if foreground.any() and n_rgb > 0:
        fg = proj[foreground, 1 : 1 + n_rgb]
        lo, hi = fg.min(dim=0).values, fg.max(dim=0).values
        rgb[foreground, :n_rgb] = (fg - lo) / (hi - lo).clamp_min(1e-12)
    else:
        logger.warning("PCA: no foreground patch above threshold %.2f; pictures are black", threshold)

    out = []
    for f1, fg, colour, (h, w) in zip(
        torch.split(first, [h * w for h, w in shapes]),
        torch.split(foreground, [h * w for h, w in shapes]),
        torch.split(rgb, [h * w for h, w in shapes]),
        shapes,
    ):
        out.append({"first": f1.reshape(h, w), "foreground": fg.reshape(h, w), "rgb": colour.reshape(h, w, 3)})
    return out


def pca_rgb(features: Sequence[torch.Tensor], n_components: int = 3) -> List[torch.Tensor]:
    """The plain PCA picture: the first ``n_components`` (at most 3) principal components of patch features (one
    (h, w, D) tensor per image, one PCA fitted jointly over all of them) as RGB channels, each min-max scaled to
    [0, 1] over the patches of all images; (h, w, 3) per image, unused channels 0. No foreground split (compare
    ``pca_foreground_rgb``): the first component, usually foreground against background, is the red channel."""
    if not features:
        raise ValueError("no images given")
    if not 1 <= n_components <= 3:
        raise ValueError(f"n_components must be 1, 2 or 3, got {n_components}")
    shapes = [f.shape[:2] for f in features]
    flat = torch.cat([f.reshape(-1, f.shape[-1]).float() for f in features])
    mean, comps = fit_pca(flat, n_components)
    proj = (flat - mean) @ comps.T  # (M, k)
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    rgb = torch.zeros(flat.shape[0], 3)
    rgb[:, : proj.shape[1]] = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return [c.reshape(h, w, 3) for c, (h, w) in zip(torch.split(rgb, [h * w for h, w in shapes]), shapes)]


def pca_pictures(
    model: torch.nn.Module,
    images: Sequence[Any],
    *,
    image_size: Optional[int] = None,
    threshold: float = 0.5,
    sign: str = "auto",
) -> Tuple[List[Tuple[torch.Tensor, np.ndarray]], List[Dict[str, torch.Tensor]]]:
    """The PCA fitted jointly over ``images``: (``prepare_image``'s (input, display) per image,
    ``pca_foreground_rgb``'s result per image)."""
    prepared = [prepare_image(img, model.patch_size, image_size) for img in images]
    feats = patch_features(model, [x for x, _ in prepared])
    return prepared, pca_foreground_rgb(feats, threshold=threshold, sign=sign)


def upsample_grid(a: torch.Tensor, patch_size: int) -> np.ndarray:
    """(h, w) or (h, w, C) patch grid -> pixel grid (nearest)."""
    chw = a[None] if a.ndim == 2 else a.permute(2, 0, 1)
    up = F.interpolate(chw[None].float(), scale_factor=patch_size, mode="nearest")[0]
    return (up[0] if a.ndim == 2 else up.permute(1, 2, 0)).numpy()


def save_pca_images(
    model: torch.nn.Module,
    images: Sequence[Tuple[str, Any]],
    out_dir: str | Path,
    *,
    image_size: Optional[int] = None,
    threshold: float = 0.5,
    sign: str = "auto",
) -> Dict[str, Any]:
    """Fit the PCA jointly over ``images`` ((name, image) pairs) and write the pictures.

    Files under ``out_dir``: ``{name}_pca.png`` (the RGB picture at the cropped image size),
    ``{name}_pca_figure.png`` (image | first component | foreground | RGB) per image, and
    ``pca_grid.png`` (every image above its PCA picture).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = model.patch_size
    prepared, results = pca_pictures(model, [img for _, img in images], image_size=image_size,
                                     threshold=threshold, sign=sign)

    paths: Dict[str, Any] = {"pca": [], "figures": [], "grid": out_dir / "pca_grid.png"}
    for (name, _), (_, display), res in zip(images, prepared, results):
        rgb = np.clip(upsample_grid(res["rgb"], p), 0.0, 1.0)
        path = out_dir / f"{name}_pca.png"
        plt.imsave(path, rgb)
        paths["pca"].append(path)

        fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
        panels = [
            (display, "image", None),
            (upsample_grid(res["first"], p), "1st component", "viridis"),
            (upsample_grid(res["foreground"], p), f"foreground (> {threshold:g})", "gray"),
            (rgb, "components 2-4", None),
        ]
        for ax, (picture, title, cmap) in zip(axes, panels):
            # Fixed range: an all-foreground mask must still show white, not a flat black.
            ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(name, fontsize=10)
        fig.tight_layout()
        figure_path = out_dir / f"{name}_pca_figure.png"
        fig.savefig(figure_path, dpi=100)
        plt.close(fig)
        paths["figures"].append(figure_path)

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    for i, ((name, _), (_, display), res) in enumerate(zip(images, prepared, results)):
        axes[0, i].imshow(display)
        axes[0, i].set_title(name, fontsize=9)
        axes[1, i].imshow(np.clip(upsample_grid(res["rgb"], p), 0.0, 1.0))
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(paths["grid"], dpi=100)
    plt.close(fig)
    return {"results": results, "paths": paths}
