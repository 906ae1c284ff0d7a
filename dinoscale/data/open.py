"""``open_dataset``: a dataset from its config string (Fashion-MNIST, an image folder or shards)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dinoscale.data.sources.fashion_mnist import FashionMNIST, is_fashion_mnist_spec, parse_fashion_mnist_spec
from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.data.sources.shards import ShardDataset, is_shard_spec


def open_dataset(spec: str, transform: Callable | None = None, max_samples: int | None = None):
    """Open a dataset from its config string.

    ``spec`` forms:

    * ``fashion-mnist[:train|:test][:PATH]`` -> :class:`FashionMNIST` (uint8 tensors);
    * an image folder -> :class:`ImageFolderDataset`: encoded bytes without a transform (the
      multi-crop augmentation decodes them, at reduced size when it can), PIL RGB with one;
    * shards (see :func:`is_shard_spec`) -> :class:`dinoscale.data.sources.shards.ShardDataset`, an
      iterable dataset that :func:`dinoscale.data.loader.build_pretrain_loader` also accepts;
      like image folders, encoded bytes without a transform and PIL RGB with one.

    ``max_samples`` keeps the first that many samples (a quick subset for evaluation).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if is_fashion_mnist_spec(spec):
        split, root = parse_fashion_mnist_spec(spec)
        dataset: Dataset = FashionMNIST(root=root, split=split, transform=transform)
    elif is_shard_spec(spec):
        image_format = "pil" if transform else "bytes"
        return ShardDataset(spec, transform=transform, max_samples=max_samples, image_format=image_format)
    elif Path(spec).is_dir():
        dataset = ImageFolderDataset(spec, transform=transform, image_format="pil" if transform else "bytes")
    else:
        raise FileNotFoundError(
            f"dataset {spec!r} not found. Expected fashion-mnist[:train|:test][:PATH], an image folder, "
            "a shard directory holding index.json, a brace pattern such as /data/shard-{000000..000127}.tar, "
            "or a pipe:/http(s): shard URL"
        )
    if max_samples is not None and max_samples < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_samples))
    return dataset
