"""MultiCropAugmentation against facebookresearch/dinov2's own DataAugmentationDINO (PyPI's ``dinov2`` wheel).

The two draw different random numbers, so the comparison is of distributions over many draws of one real photo:
the crops' sizes, and per crop slot the average and spread of each channel's mean (what the scales, flips, colour
jitter, grayscale and solarize decide) and, for the local crops, of each channel's pixel spread. The global crops'
pixel spread is left out: blur lowers it, and the reference's code inverts the blur probabilities (its first global
crop is never blurred, its second 90% of the time), where ours are the documented ones (the local crops: 0.5 in
both).
"""

import io
import logging

import pytest
import torch
from PIL import Image

from dinoscale.data.transforms.multicrop import MultiCropAugmentation

augmentations = pytest.importorskip(
    "dinov2.data.augmentations",
    reason="facebookresearch/dinov2's code: pip install --no-deps dinov2==0.0.1.dev2 (.ci/run installs it)",
)

N = 400  # draws per pipeline: the per-crop channel means spread by about 0.5, so their average by 0.025
G, L, NL = 64, 32, 4


def _stats(crops: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) normalised crops -> (3 statistics, 3 channels): mean and spread of the per-crop channel means,
    mean of the per-crop channel standard deviations."""
    m, s = crops.mean(dim=(2, 3)), crops.std(dim=(2, 3))
    return torch.stack([m.mean(0), m.std(0), s.mean(0)])


def test_crops_follow_dinov2s_own_distribution(photo):
    logging.getLogger("dinov2").setLevel(logging.WARNING)
    kw = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=NL,
              global_crops_size=G, local_crops_size=L)
    reference = augmentations.DataAugmentationDINO(**kw)
    ours = MultiCropAugmentation(**kw)
    buf = io.BytesIO()
    Image.fromarray(photo).resize((240, 160), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    torch.manual_seed(0)
    ref_out = [reference(Image.open(io.BytesIO(data)).convert("RGB")) for _ in range(N)]
    our_out = [ours(data) for _ in range(N)]

    for slot in range(2):
        a = torch.stack([o["global_crops"][slot] for o in ref_out])
        b = torch.stack([o["global_crops"][slot] for o in our_out])
        assert a.shape == b.shape == (N, 3, G, G)
        # the channel means only: blur lowers a crop's pixel spread, and the blur probabilities differ
        assert (_stats(a)[:2] - _stats(b)[:2]).abs().max() < 0.15, (slot, _stats(a), _stats(b))
    a = torch.stack([c for o in ref_out for c in o["local_crops"]])
    b = torch.stack([c for o in our_out for c in o["local_crops"]])
    assert a.shape == b.shape == (N * NL, 3, L, L)
    assert (_stats(a) - _stats(b)).abs().max() < 0.15, (_stats(a), _stats(b))
    # The statistics are not trivially equal: a pipeline without colour jitter and grayscale is far off.
    plain = MultiCropAugmentation(**kw, photometric_on_device=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    c = torch.stack([plain(data)["global_crops"][1] for _ in range(N)]).float().div(255).sub(mean).div(std)
    assert (_stats(c) - _stats(torch.stack([o["global_crops"][1] for o in ref_out]))).abs().max() > 0.3
