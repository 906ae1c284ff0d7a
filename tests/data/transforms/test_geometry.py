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


def _photo(height, width):
    """A real photo at a small size: (3, H, W) uint8, a view of (H, W, 3) pixels as the decoders give."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    pixels = np.array(Image.fromarray(skdata.astronaut()).resize((width, height), Image.BICUBIC))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def test_small_image_crops_match_the_resize_kernel_per_crop():
    """Crops of a small image come from the batched matmuls; they match the uint8 kernel within 2 levels in under
    1% of the pixels (its fixed-point weights), at both sizes, up and down, flipped or not, on non-square images."""
    from dinoscale.data.transforms.geometry import SMALL_IMAGE_PIXELS, resized_crop, resized_crops

    torch.manual_seed(0)
    for height, width, sizes in [(28, 28, [28, 28, 14, 14, 14, 14]), (30, 45, [32, 32] + [16] * 6), (40, 24, [24, 9])]:
        assert height * width <= SMALL_IMAGE_PIXELS
        image = _photo(height, width)
        differ = total = 0
        for _ in range(10):
            boxes = sample_crop_boxes(height, width, len(sizes), (0.05, 1.0)).tolist()
            flips = torch.rand(len(sizes)).lt(0.5).tolist()
            crops = resized_crops(image, boxes, sizes, flips)
            for crop, box, size, flip in zip(crops, boxes, sizes, flips):
                expected = resized_crop(image, box, size, flip)
                assert crop.shape == expected.shape == (1, 3, size, size) and crop.dtype == torch.uint8
                gap = (crop.int() - expected.int()).abs()
                assert gap.max() <= 2, (box, size, flip)
                differ, total = differ + int(gap.ne(0).sum()), total + gap.numel()
        assert differ < 0.01 * total


def test_small_image_crops_of_any_layout_are_the_same():
    """Planar, channels-last (as decoded) and a grey image repeated as a stride-0 view (as a 1-channel tensor input
    becomes) give the same crops."""
    from dinoscale.data.transforms.geometry import resized_crops

    grey = _photo(28, 28)[:1]
    layouts = [grey.expand(3, -1, -1), grey.expand(3, -1, -1).contiguous(),
               grey.expand(3, -1, -1).permute(1, 2, 0).contiguous().permute(2, 0, 1)]
    boxes, sizes, flips = [(0, 0, 28, 28), (2, 3, 20, 11), (5, 1, 6, 9)], [28, 14, 14], [False, True, False]
    results = [resized_crops(image, boxes, sizes, flips) for image in layouts]
    for crops in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], crops))
    assert all(torch.equal(c[0, 0], c[0, 1]) and torch.equal(c[0, 0], c[0, 2]) for c in results[0])


def test_larger_images_are_cropped_by_the_kernel_per_crop():
    from dinoscale.data.transforms.geometry import SMALL_IMAGE_PIXELS, resized_crop, resized_crops

    image = _photo(50, 50)
    assert 50 * 50 > SMALL_IMAGE_PIXELS
    boxes, sizes, flips = [(0, 0, 50, 50), (3, 4, 20, 17)], [32, 16], [False, True]
    for crop, box, size, flip in zip(resized_crops(image, boxes, sizes, flips), boxes, sizes, flips):
        assert torch.equal(crop, resized_crop(image, box, size, flip))
