"""Frozen-feature extraction for evaluation (kNN, linear probes, feature dumps).

``extract_outputs`` is the engine: it runs a forward function over a dataset in batches and returns its
outputs with the labels, in dataset order. ``extract_features`` uses it for CLS embeddings (and optionally
the mean of the patch tokens). In a distributed run every rank embeds its own interleaved slice of the
dataset (no padding duplicates) and the slices are gathered back to every rank and re-sorted by index.
Images that fail to load are skipped, counted and reported instead of aborting the whole pass.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from dinoscale import distributed
from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.data.sources.transformed import TransformedDataset
from dinoscale.data.transforms.decode import load_rgb
from dinoscale.device import autocast, inference_autocast_dtype

logger = logging.getLogger(__name__)

_MAX_SKIP_LOGS = 10  # individual warnings per extraction; the total is always reported


# --------------------------------------------------------------------------------------
# Robust loading: skip unreadable samples
# --------------------------------------------------------------------------------------


class _IndexedSafeDataset(Dataset):
    """Wraps a map-style dataset: returns (index, image, label, error) and never raises."""

    def __init__(self, dataset: Dataset, transform: Optional[Callable] = None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = _split_sample(_strict_getitem(self.dataset, index))
            if self.transform is not None:
                image = self.transform(image)
            if not isinstance(image, torch.Tensor):
                raise TypeError(
                    f"sample image is a {type(image).__name__}, not a tensor; pass transform=eval_transform(...)"
                )
            return index, image, label, None
        except Exception as exc:  # noqa: BLE001 - any loading failure is reported and skipped
            return index, None, None, f"{type(exc).__name__}: {exc}"


def _strict_getitem(dataset: Dataset, index: int) -> Any:
    """``dataset[index]``, except that an unreadable image file raises.

    ``ImageFolderDataset`` substitutes the next readable image for a broken one (right for
    training, wrong here: the feature row would belong to another file), so its samples are
    read directly; ``Subset`` and ``TransformedDataset`` wrappers are looked through.
    """
    if isinstance(dataset, Subset):
        return _strict_getitem(dataset.dataset, dataset.indices[index])
    if isinstance(dataset, TransformedDataset):
        image, label = _strict_getitem(dataset.dataset, index)
        return dataset.transform(image), label
    if isinstance(dataset, ImageFolderDataset):
        path, label = dataset.samples[index]
        image = load_rgb(path) if dataset.image_format == "pil" else Path(path).read_bytes()
        if dataset.transform is not None:
            image = dataset.transform(image)
        return image, label
    return dataset[index]


def _split_sample(sample: Any) -> Tuple[Any, int]:
    if isinstance(sample, dict):
        image = sample.get("image", sample.get("img"))
        label = sample.get("label", sample.get("target", -1))
    elif isinstance(sample, (tuple, list)):
        if len(sample) < 1:
            raise ValueError("empty sample")
        image = sample[0]
        label = sample[1] if len(sample) > 1 else -1
    else:
        image, label = sample, -1
    if isinstance(label, torch.Tensor):
        label = int(label.item())
    return image, -1 if label is None else int(label)


def _collate_indexed(batch):
    failures = [(index, error) for index, _, _, error in batch if error is not None]
    good = [(index, image, label) for index, image, label, error in batch if error is None]
    if not good:
        return None, None, None, failures
    indices = torch.tensor([g[0] for g in good], dtype=torch.long)
    shapes = {tuple(g[1].shape) for g in good}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch have different shapes {sorted(shapes)}; use a transform that crops")
    images = torch.stack([g[1] for g in good])
    labels = torch.tensor([g[2] for g in good], dtype=torch.long)
    return indices, images, labels, failures


# --------------------------------------------------------------------------------------
# Gathering variable-sized per-rank results
# --------------------------------------------------------------------------------------


def gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors of different lengths (dim 0) from all ranks, rank order.

    Single process: returns ``tensor`` unchanged.
    """
    world = distributed.get_world_size()
    if world == 1:
        return tensor
    counts = torch.zeros(world, dtype=torch.long, device=tensor.device)
    counts[distributed.get_rank()] = tensor.shape[0]
    distributed.all_reduce_sum_(counts)
    max_count = int(counts.max())
    padded = tensor.new_zeros((max_count,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = distributed.all_gather_no_grad(padded)
    parts = [gathered[r * max_count : r * max_count + int(counts[r])] for r in range(world)]
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _progress(iterable, total: Optional[int], enabled: bool, desc: str):
    if not enabled or not distributed.is_main_process():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth failing for
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


@torch.inference_mode()
def extract_outputs(
    model: torch.nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    forward_fn: Callable[[torch.nn.Module, torch.Tensor], Dict[str, torch.Tensor]],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[str | torch.device] = None,
    autocast_dtype: Any = None,
    transform: Optional[Callable] = None,
    progress: bool = True,
    desc: str = "features",
) -> Dict[str, Any]:
    """Run ``forward_fn(model, images) -> {name: (B, ...) tensor}`` over a dataset.

    This is the engine behind ``extract_features`` and the linear-probe feature cache.

    Args:
        dataset_or_loader: a map-style dataset yielding (image, label) or a DataLoader over
            one (its batch size / workers are kept; sampler and collate are replaced so ranks
            can shard and bad samples can be skipped).
        device: where to run; default the model's device. A different device moves the
            model there for the pass and back afterwards.
        autocast_dtype: None = bf16 on CPUs with native bf16 and on CUDA (fp16 if no bf16),
            else fp32; pass torch.float32 / "fp32" to disable, or a dtype to force.
        transform: applied to each sample's image (e.g. ``eval_transform(224, 14)``) when the
            dataset does not transform itself.
        progress, desc: show a progress bar (main process only) with this label.

    Returns the concatenated float32 CPU outputs plus ``labels`` (N,), ``indices`` (N,)
    (dataset positions of the kept samples), ``num_skipped`` and ``skipped`` (list of
    (index, error) for samples that failed to load). For a map-style dataset the rows are in
    dataset order on every rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader_in = dataset_or_loader if isinstance(dataset_or_loader, DataLoader) else None
    dataset = loader_in.dataset if loader_in is not None else dataset_or_loader
    if loader_in is not None:
        # Keep the caller's batching, but use our sampler/collate (sharding, skip-and-count).
        batch_size = loader_in.batch_size or batch_size
        num_workers = loader_in.num_workers

    model_device = _model_device(model)
    device = model_device if device is None else torch.device(device)
    amp_dtype = inference_autocast_dtype(device, autocast_dtype)
    was_training = model.training
    moved = device != model_device
    if moved:
        model.to(device)
    model.eval()

    rank, world = distributed.get_rank(), distributed.get_world_size()
    outputs: Dict[str, List[torch.Tensor]] = {}
    labels: List[torch.Tensor] = []
    indices: List[torch.Tensor] = []
    skipped: List[Tuple[int, str]] = []
    n_forwards, last_image = 0, None
    try:
        if isinstance(dataset, IterableDataset):
            if world > 1:
                raise ValueError(
                    "distributed feature extraction needs a map-style dataset (with __len__/__getitem__) "
                    "so ranks can split it and restore dataset order"
                )
            batches = _iterable_batches(loader_in, dataset, batch_size, num_workers, transform)
            total = None
        else:
            if len(dataset) < world:  # known on every rank: all fail alike, none waits
                raise ValueError(f"{len(dataset)} samples cannot be split over {world} ranks")
            # Interleaved shard like DistributedSampler(shuffle=False) without the padding duplicates.
            shard = list(range(rank, len(dataset), world))
            loader = DataLoader(
                _IndexedSafeDataset(dataset, transform),
                batch_size=batch_size,
                sampler=shard,
                num_workers=num_workers,
                collate_fn=_collate_indexed,
                pin_memory=device.type == "cuda",
            )
            batches = iter(loader)
            total = len(loader)
        for batch_indices, images, batch_labels, failures in _progress(batches, total, progress, desc):
            for index, error in failures:
                if len(skipped) < _MAX_SKIP_LOGS:  # a systematic failure must not flood the log
                    logger.warning("skipping sample %s: %s", index, error)
                skipped.append((index, error))
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                out = forward_fn(model, images)
            n_forwards += 1
            last_image = images[:1]
            for name, value in out.items():
                outputs.setdefault(name, []).append(value.float().cpu())
            labels.append(batch_labels)
            indices.append(batch_indices)
        if world > 1:
            # A sharded (FSDP) model all-gathers its parameters inside every forward, so every
            # rank must run as many forwards as the rank with the most batches (rank 0: the
            # interleaved split gives it the largest shard), before any other collective.
            # Ranks with fewer batches (uneven split, batches lost to unreadable images) run
            # throw-away forwards on one of their own images.
            target = math.ceil(len(range(0, len(dataset), world)) / batch_size)
            if n_forwards < target and last_image is None:
                raise RuntimeError(
                    f"rank {rank} has no readable sample ({len(skipped)} skipped), so it cannot take part in "
                    "the model's collectives; use fewer ranks or fix the unreadable images"
                )
            for _ in range(target - n_forwards):
                with autocast(device, amp_dtype):
                    forward_fn(model, last_image)
    finally:
        if moved:
            model.to(model_device)
        model.train(was_training)

    result: Dict[str, Any] = {}
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if world > 1:
        all_indices = gather_variable(local_indices.to(device)).cpu()
        order = torch.argsort(all_indices)
        result["indices"] = all_indices[order]
        result["labels"] = gather_variable(local_labels.to(device)).cpu()[order]
        for name in sorted(outputs):
            local = torch.cat(outputs[name]).to(device)
            result[name] = gather_variable(local).cpu()[order]
        skipped_count = torch.tensor([len(skipped)], device=device)
        distributed.all_reduce_sum_(skipped_count)
        num_skipped = int(skipped_count)
    else:
        result["indices"] = local_indices
        result["labels"] = local_labels
        for name, values in outputs.items():
            result[name] = torch.cat(values)
        num_skipped = len(skipped)
    result["num_skipped"] = num_skipped
    result["skipped"] = skipped  # this rank's failures (index, error)
    if num_skipped and distributed.is_main_process():
        logger.warning("feature extraction skipped %d unreadable sample(s)", num_skipped)
    if result["indices"].numel() == 0:
        raise RuntimeError(f"no sample could be loaded ({num_skipped} skipped); first errors: {skipped[:3]}")
    return result


def _collate_iterable(batch, transform=None):
    images, labels = [], []
    for sample in batch:
        image, label = _split_sample(sample)
        if transform is not None:
            image = transform(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"sample image is a {type(image).__name__}, not a tensor; pass a transform")
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _iterable_batches(loader_in, dataset, batch_size, num_workers, transform):
    """Batches from an iterable dataset (single process): (indices, images, labels, failures).

    Iterable streams have no random access, so a failing sample cannot be skipped here: the
    stream itself (e.g. webdataset's handler) is responsible for that.
    """
    if loader_in is None:
        loader_in = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=functools.partial(_collate_iterable, transform=transform),
        )
    elif transform is not None:
        raise ValueError("transform= cannot be combined with a DataLoader over an iterable dataset")
    position = 0
    for batch in loader_in:
        if isinstance(batch, dict):
            images = batch.get("image", batch.get("img"))
            batch_labels = batch.get("label", batch.get("target", -1))
        else:
            images, batch_labels = batch[0], (batch[1] if len(batch) > 1 else -1)
        n = images.shape[0]
        batch_labels = torch.as_tensor(batch_labels, dtype=torch.long).expand(n).clone()
        yield torch.arange(position, position + n), images, batch_labels, []
        position += n


def _default_forward(pooled_patches: bool):
    def forward(model: torch.nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if hasattr(model, "forward_features"):
            out = model.forward_features(images)
            if isinstance(out, dict) and "x_norm_clstoken" in out:
                result = {"cls": out["x_norm_clstoken"]}
                if pooled_patches:
                    result["patch_mean"] = out["x_norm_patchtokens"].mean(dim=1)
                return result
        if pooled_patches:
            raise ValueError(
                "pooled_patches=True needs a model whose forward_features returns "
                "'x_norm_clstoken' and 'x_norm_patchtokens'"
            )
        out = model(images)
        if out.ndim != 2:
            raise ValueError(f"model(x) must return (B, D) embeddings, got shape {tuple(out.shape)}")
        return {"cls": out}

    return forward


def extract_features(
    model: torch.nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    *,
    pooled_patches: bool = False,
    **options: Any,
) -> Dict[str, Any]:
    """Embed a dataset with a frozen backbone.

    Args:
        model: a ``DinoVisionTransformer`` (uses ``forward_features``) or any module whose
            ``model(x)`` returns (B, D) embeddings.
        pooled_patches: also return the mean of the last block's normalised patch tokens.
        options: ``batch_size``, ``num_workers``, ``device``, ``autocast_dtype``, ``transform``,
            ``progress`` as in :func:`extract_outputs`.

    Returns:
        ``{"cls": (N, D) float32, "patch_mean": (N, D) (if pooled_patches), "labels": (N,)
        long, "indices": (N,) long, "num_skipped": int, "skipped": [(index, error)]}``.
    """
    return extract_outputs(model, dataset_or_loader, _default_forward(pooled_patches), **options)


def sample_names(dataset: Dataset, indices: torch.Tensor) -> List[str]:
    """A readable name per kept sample: the file path relative to the image folder, or
    ``"<split>/<index>"`` for datasets without files."""
    base, positions = dataset, [int(i) for i in indices]
    while True:
        if isinstance(base, Subset):
            positions = [int(base.indices[i]) for i in positions]
            base = base.dataset
        elif isinstance(base, TransformedDataset):
            base = base.dataset
        else:
            break
    samples = getattr(base, "samples", None)
    if samples is not None:
        root = Path(getattr(base, "root", "."))
        names = []
        for i in positions:
            path = Path(samples[i][0])
            try:
                names.append(str(path.relative_to(root)))
            except ValueError:
                names.append(str(path))
        return names
    split = getattr(base, "split", "sample")
    return [f"{split}/{i}" for i in positions]
