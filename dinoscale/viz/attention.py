"""Self-attention maps of the CLS token in the last block, as shown in the DINO paper.

For an image of ``h x w`` patches, the last block's attention probabilities ``A`` of shape
(heads, T, T) with token order ``[cls, registers, patches]`` give one map per head,

    map_k = A[k, 0, 1 + R:].reshape(h, w)

(register tokens are dropped, so the map covers exactly the patch grid). Maps are upsampled
to pixels with nearest-neighbour interpolation (one patch = one flat block, as DINO shows
them) and optionally thresholded to the smallest set of patches holding a given fraction of
the attention mass (DINO's ``--threshold 0.6``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dinoscale.eval.transforms import round_to_patch, to_uint8_or_float_chw  # noqa: E402

logger = logging.getLogger(__name__)

SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def prepare_image(image: Any, patch_size: int, image_size: Optional[int] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """Image -> (normalised model input (3, H, W), display image (H, W, 3) float in [0, 1]).

    The shorter side is resized to ``image_size`` rounded to the patch size (kept as is when
    None), then both sides are center-cropped down to multiples of the patch size, so the
    aspect ratio is (nearly) kept and the result need not be square.
    """
    x = TF.to_dtype(to_uint8_or_float_chw(image), torch.float32, scale=True)
    if image_size is not None:
        x = TF.resize(
            x, [round_to_patch(image_size, patch_size)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
        ).clamp_(0.0, 1.0)
    h, w = x.shape[-2:]
    h, w = h - h % patch_size, w - w % patch_size
    if h == 0 or w == 0:
        raise ValueError(f"image of size {tuple(x.shape[-2:])} is smaller than one patch ({patch_size} px)")
    x = TF.center_crop(x, [h, w])
    display = x.permute(1, 2, 0).numpy().copy()
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)), display


def load_images(names_or_paths: Sequence[str]) -> List[Tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) for file paths or scikit-image sample names (``"skimage"`` = the defaults)."""
    from PIL import Image

    out = []
    for item in names_or_paths:
        if item == "skimage":
            out.extend(load_images(SKIMAGE_SAMPLES))
            continue
        path = Path(item)
        if path.is_file():
            with Image.open(path) as im:
                out.append((path.stem, np.asarray(im.convert("RGB"))))
            continue
        try:
            import skimage.data
        except ImportError as exc:
            raise ImportError(
                f"{item!r} is not a file, and scikit-image (for its sample photos) is not installed: "
                "pip install scikit-image, or pass image files"
            ) from exc
        loader = getattr(skimage.data, item, None)
        if loader is None or not callable(loader):
            raise FileNotFoundError(f"{item!r} is neither an image file nor a scikit-image sample (e.g. astronaut)")
        array = np.asarray(loader())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        out.append((item, array[..., :3]))
    return out


# --------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def attention_maps(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """CLS->patch attention of the last block: (heads, H/p, W/p) for a (3, H, W) or (1, 3, H, W) input.

    ``model`` must provide ``get_last_selfattention``, ``patch_size`` and
    ``num_register_tokens`` (``DinoVisionTransformer`` does). H and W must be multiples of
    the patch size (``prepare_image`` crops to that).
    """
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
    p = model.patch_size
    H, W = image.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; use prepare_image()")
    was_training = model.training
    model.eval()
    try:
        attn = model.get_last_selfattention(image.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    h, w = H // p, W // p
    first_patch = 1 + int(getattr(model, "num_register_tokens", 0))
    expected_tokens = first_patch + h * w
    if attn.ndim != 4 or attn.shape[-1] != expected_tokens:
        raise ValueError(
            f"attention of shape {tuple(attn.shape)} does not match 1 cls + {first_patch - 1} registers + "
            f"{h * w} patches"
        )
    return attn[0, :, 0, first_patch:].reshape(-1, h, w).float().cpu()


def upsample_maps(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(heads, h, w) -> (heads, h*p, w*p), nearest neighbour (each patch a flat block)."""
    return F.interpolate(maps[None], scale_factor=patch_size, mode="nearest")[0]


def threshold_maps(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Boolean masks (heads, h, w): per head, the fewest patches holding ``mass`` of its attention."""
    if not 0 < mass <= 1:
        raise ValueError(f"attention mass threshold must be in (0, 1], got {mass}")
    heads = maps.shape[0]
    flat = maps.reshape(heads, -1)
    flat = flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-12)
    values, order = flat.sort(dim=1, descending=True)
    cumulative = values.cumsum(dim=1)
    # Keep a patch if the mass before it is still short of the target (so the crossing patch is kept).
    keep_sorted = (cumulative - values) < mass
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(maps.shape)


# --------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------


def normalise01(a: np.ndarray) -> np.ndarray:
    """``a`` min-max scaled to [0, 1] (all zeros when constant)."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def save_attention_maps(
    model: torch.nn.Module,
    image: Any,
    out_dir: str | Path,
    name: str,
    *,
    image_size: Optional[int] = None,
    threshold: Optional[float] = None,
    cmap: str = "inferno",
) -> Dict[str, Any]:
    """Write the attention pictures of one image and return the maps and file paths.

    Files (all under ``out_dir``): ``{name}_attn_mean.png`` and ``{name}_attn_head{k}.png``
    (exactly the cropped image size, one pixel per pixel), and ``{name}_attention.png``, a
    figure with the image, the head-averaged map over the image and every head.
    With ``threshold`` (attention mass, e.g. 0.6) the per-head files show the kept region.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, display = prepare_image(image, model.patch_size, image_size)
    maps = attention_maps(model, x)  # (heads, h, w)
    if threshold is not None:
        shown = threshold_maps(maps, threshold).float()
    else:
        shown = maps
    full = upsample_maps(shown, model.patch_size).numpy()
    mean_full = upsample_maps(maps.mean(dim=0, keepdim=True), model.patch_size)[0].numpy()

    paths = {"mean": out_dir / f"{name}_attn_mean.png", "heads": [], "figure": out_dir / f"{name}_attention.png"}
    plt.imsave(paths["mean"], normalise01(mean_full), cmap=cmap, vmin=0.0, vmax=1.0)
    for k, head_map in enumerate(full):
        path = out_dir / f"{name}_attn_head{k}.png"
        plt.imsave(path, normalise01(head_map), cmap=cmap, vmin=0.0, vmax=1.0)
        paths["heads"].append(path)

    heads = full.shape[0]
    cols = min(heads, 6)
    rows = 1 + (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, max(cols, 2), figsize=(2.6 * max(cols, 2), 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(display)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].imshow(display)
    axes[0, 1].imshow(normalise01(mean_full), cmap=cmap, alpha=0.6)
    axes[0, 1].set_title("mean over heads", fontsize=9)
    for k in range(heads):
        ax = axes[1 + k // cols, k % cols]
        ax.imshow(normalise01(full[k]), cmap=cmap)
        ax.set_title(f"head {k}", fontsize=9)
    fig.suptitle(f"{name}: CLS attention, last block ({x.shape[1]}x{x.shape[2]} px)", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["figure"], dpi=100)
    plt.close(fig)
    return {"maps": maps, "display": display, "paths": paths}
