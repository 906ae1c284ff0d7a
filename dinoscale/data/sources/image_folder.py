"""Image folders: every image file below a folder, labelled by its first-level class sub-folder."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from dinoscale.data.skips import report_skip
from dinoscale.data.transforms.decode import DECODE_ERRORS, load_rgb

logger = logging.getLogger("dinoscale.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_images(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    """All image files below ``directory`` (recursive, sorted, hidden entries ignored)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and name.lower().endswith(extensions):
                found.append(Path(dirpath) / name)
    return found


class ImageFolderDataset(Dataset):
    """Images below ``root``, recursively.

    Labels: when ``root`` has sub-folders that contain images, each such first-level
    sub-folder is a class (sorted names -> ids 0..C-1, ``.classes``) and images directly in
    ``root`` are ignored (with a warning). A folder without such sub-folders (a flat folder)
    is unlabeled: every label is -1 and ``classes`` is empty.

    Args:
        root: the folder.
        transform: optional callable applied to the image (not the label).
        extensions: file-name endings that count as images (case-insensitive).
        image_format: ``"pil"`` returns a decoded RGB PIL image; ``"bytes"`` returns the file
            bytes untouched (the augmentation decodes them, and the bytes can be written to
            shards without re-encoding). In ``"bytes"`` mode only the header is checked here;
            a file that fails to decode later is skipped by the loader.

    Unreadable or corrupt files are skipped: ``dataset[i]`` then returns the next valid
    sample (index i+1, i+2, ... wrapping around), counts the file in ``num_skipped`` (per
    process) and reports it once through :func:`report_skip`. Only a folder without a
    single readable image raises.

    Attributes:
        samples: list of ``(path, label)``.
        classes: sorted class names (empty when unlabeled).
        class_to_idx: class name -> id.
        num_skipped: number of bad files met in this process.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        image_format: str = "pil",
    ):
        if image_format not in ("pil", "bytes"):
            raise ValueError(f"image_format must be 'pil' or 'bytes', got {image_format!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found or not a directory: {self.root}")
        self.transform = transform
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.image_format = image_format
        self.num_skipped = 0

        class_dirs = sorted(
            entry.name
            for entry in os.scandir(self.root)
            if entry.is_dir() and not _is_hidden(entry.name) and _scan_images(Path(entry.path), self.extensions)
        )
        samples: list[tuple[str, int]] = []
        if class_dirs:
            self.classes = class_dirs
            self.class_to_idx = {name: i for i, name in enumerate(class_dirs)}
            for name in class_dirs:
                samples.extend((str(p), self.class_to_idx[name]) for p in _scan_images(self.root / name, self.extensions))
            loose = [
                e.name for e in os.scandir(self.root) if e.is_file() and e.name.lower().endswith(self.extensions)
            ]
            if loose:
                logger.warning(
                    "%s has class sub-folders; ignoring %d image(s) directly in it (e.g. %s)",
                    self.root,
                    len(loose),
                    sorted(loose)[0],
                )
        else:
            self.classes = []
            self.class_to_idx = {}
            samples = [(str(p), -1) for p in _scan_images(self.root, self.extensions)]
        if not samples:
            raise ValueError(f"no image files with extensions {self.extensions} found under {self.root}")
        self.samples = samples

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        if self.image_format == "pil":
            return load_rgb(path)
        with open(path, "rb") as f:
            data = f.read()
        # Header check only: cheap, and catches empty / non-image files early.
        with Image.open(io.BytesIO(data)):
            pass
        return data

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for attempt in range(n):
            path, label = self.samples[(index + attempt) % n]
            try:
                image = self._load(path)
            except DECODE_ERRORS as exc:
                self.num_skipped += 1
                report_skip("corrupt_sample", path, "", f"{type(exc).__name__}: {exc}")
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label
        raise RuntimeError(f"none of the {n} image files under {self.root} could be read")

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unlabeled"
        return f"ImageFolderDataset(root={str(self.root)!r}, {len(self)} images, {kind}, image_format={self.image_format!r})"
