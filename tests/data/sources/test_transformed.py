"""wrap_with_transform / TransformedDataset."""

import numpy as np
import torch

from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.data.sources.transformed import wrap_with_transform


def test_wrap_with_transform(tmp_path, helpers):
    helpers.write_image(tmp_path / "k" / "a.png", 9)
    ds = wrap_with_transform(ImageFolderDataset(tmp_path), lambda img: torch.from_numpy(np.array(img)).sum())
    value, label = ds[0]
    assert int(value) == 9 * 3 * 144 - 9 * 3 + 10 * 3 and label == 0
    assert ds.classes == ["k"] and len(ds) == 1
    assert wrap_with_transform(ds, None) is ds
