"""Helpers for the transform tests: a real photo, small multi-crop settings (fixture ``multicrop``), one thread."""

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from dinoscale.data.transforms.multicrop import MultiCropAugmentation
from dinoscale.data.transforms.normalize import IMAGENET_MEAN, IMAGENET_STD

G, L, NL = 32, 16, 3  # small crops keep the tests fast


def small_aug(**kw):
    args = dict(global_crops_size=G, local_crops_size=L, local_crops_number=NL)
    args.update(kw)
    return MultiCropAugmentation(**args)


def encode(arr, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def check_output(out, dtype=torch.float32, n_local=NL):
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == n_local
    for t in out["global_crops"]:
        assert t.shape == (3, G, G) and t.dtype == dtype
    for t in out["local_crops"]:
        assert t.shape == (3, L, L) and t.dtype == dtype
    if dtype == torch.float32:
        for t in out["global_crops"] + out["local_crops"]:
            assert torch.isfinite(t).all()
            # Normalised [0, 1] data lies within [-mean/std, (1-mean)/std].
            lo = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
            hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
            assert (t >= lo.view(3, 1, 1) - 1e-4).all() and (t <= hi.view(3, 1, 1) + 1e-4).all()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Per-sample augmentation runs single-threaded in data-loader workers; on a busy shared CPU
    intra-op threads only add synchronisation cost to these small tensors."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def photo():
    """A real photo, downscaled: (H, W, 3) uint8."""
    return np.array(Image.fromarray(skdata.chelsea()).resize((150, 100), Image.BICUBIC))


@pytest.fixture
def multicrop():
    return types.SimpleNamespace(G=G, L=L, NL=NL, small_aug=small_aug, encode=encode, check_output=check_output)
