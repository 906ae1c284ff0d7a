"""ImageFolderDataset: class folders, flat folders, bytes mode, and skipping unreadable files."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoscale.data.skips import collect_skips
from dinoscale.data.sources.image_folder import ImageFolderDataset


def _jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_image_folder_with_classes(tmp_path, helpers):
    helpers.write_image(tmp_path / "dog" / "a.png", 10)
    helpers.write_image(tmp_path / "dog" / "nested" / "b.png", 20)  # recursive
    helpers.write_image(tmp_path / "cat" / "c.jpg", 30, fmt="JPEG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    helpers.write_image(tmp_path / ".hidden" / "d.png", 40)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1}
    assert len(ds) == 3
    assert [(Path(p).name, label) for p, label in ds.samples] == [("c.jpg", 0), ("a.png", 1), ("b.png", 1)]
    image, label = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    assert np.asarray(image)[5, 5].tolist() == [10, 10, 10]


def test_image_folder_flat_is_unlabeled_and_bytes_mode(tmp_path, helpers):
    helpers.write_image(tmp_path / "x.png", 50)
    helpers.write_image(tmp_path / "y.PNG", 60)
    ds = ImageFolderDataset(tmp_path, image_format="bytes")
    assert ds.classes == [] and ds.targets == [-1, -1]
    data, label = ds[0]
    assert isinstance(data, bytes) and label == -1
    assert data == (tmp_path / "x.png").read_bytes()


def test_image_folder_corrupt_skipped_and_counted(tmp_path, caplog, helpers):
    helpers.write_image(tmp_path / "a" / "0.png", 1)
    (tmp_path / "a" / "1.png").write_bytes(b"definitely not a png")
    truncated = _jpeg_bytes(77)
    (tmp_path / "a" / "2.jpg").write_bytes(truncated[: len(truncated) // 2])
    helpers.write_image(tmp_path / "a" / "3.png", 3)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"):
        image, _ = ds[1]  # both 1.png and 2.jpg are bad -> next valid is 3.png
        ds[1]  # same bad files again: counted again, logged once
    assert np.asarray(image)[5, 5].tolist() == [3, 3, 3]
    assert ds.num_skipped == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("1.png" in m for m in messages) == 1
    assert sum("2.jpg" in m for m in messages) == 1
    # Wrap-around: the last file is fine, but a corrupt last file continues at index 0.
    (tmp_path / "a" / "3.png").write_bytes(b"")
    with collect_skips() as events:
        image, _ = ds[3]
    assert np.asarray(image)[5, 5].tolist() == [1, 1, 1]
    assert [e.kind for e in events] == ["corrupt_sample"] and events[0].source.endswith("3.png")


def test_image_folder_all_bad_and_empty(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"xx")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 1 image files"):
        ds[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
