"""RandomResizedCrop boxes: scale and aspect distributions, the centred fallback."""

import math

import torch

from dinoscale.data.transforms.geometry import sample_crop_boxes


def test_crop_box_scale_and_aspect_distribution():
    torch.manual_seed(0)
    height, width, n = 300, 400, 4000
    for scale in [(0.05, 0.32), (0.32, 1.0)]:
        boxes = sample_crop_boxes(height, width, n, scale)
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
        frac = (h * w).double() / (height * width)
        # Rounding the sides to whole pixels moves the area by at most a few percent.
        assert frac.min() >= scale[0] * 0.97 and frac.max() <= scale[1] * 1.03
        log_aspect = torch.log(w.double() / h.double())
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        assert log_aspect.min() >= lo - 0.02 and log_aspect.max() <= hi + 0.02
        if scale == (0.05, 0.32):
            # Every proposal fits, so area and log-aspect are uniform: compare deciles.
            for values, a, b in [(frac, scale[0], scale[1]), (log_aspect, lo, hi)]:
                hist = torch.histc(((values - a) / (b - a)).clamp(0, 1 - 1e-9).float(), bins=10, min=0, max=1)
                assert (hist / n - 0.1).abs().max() < 0.025, hist


def test_crop_box_fallback_is_centred_and_within_ratio():
    # A 10 x 1000 strip: no proposal with area >= 90% and aspect <= 4/3 fits.
    torch.manual_seed(0)
    boxes = sample_crop_boxes(10, 1000, 5, (0.9, 1.0))
    assert boxes.tolist() == [[0, 493, 10, 13]] * 5
