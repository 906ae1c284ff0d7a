"""A transform applied to the images of any ``(image, label)`` dataset (evaluation wraps its datasets so)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset


class TransformedDataset(Dataset):
    """``dataset`` with ``transform`` applied to each image; labels and length unchanged."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label

    def __getattr__(self, name: str) -> Any:
        # Expose .classes, .samples, ... of the wrapped dataset. Guard against recursion
        # while unpickling (before __dict__ holds "dataset").
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def wrap_with_transform(dataset: Dataset, transform: Callable | None) -> Dataset:
    """Apply ``transform`` to the images of any ``(image, label)`` dataset (None: unchanged)."""
    if transform is None:
        return dataset
    return TransformedDataset(dataset, transform)
