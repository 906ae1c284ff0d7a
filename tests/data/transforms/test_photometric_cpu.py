"""dinoscale.data.transforms.photometric_cpu: OpenCV's per-sample photometry against the tensor implementation
(the accelerator path), step by step and whole, and its thread pool across fork."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dinoscale.data.transforms import photometric
from dinoscale.data.transforms.photometric import photometric_sample
from dinoscale.data.transforms.photometric_cpu import _adjust_hue, _color_jitter, _hwc_float, photometric_sample_cpu

# float32 rounding of a few dozen operations, in [0, 1] units (one uint8 level is 0.0039)
TOLERANCE = 1e-5


def planar(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)[None].contiguous()


def colours() -> np.ndarray:
    """(H, W, 3) float32: random pixels, then each hue sector's edges, greys, black and white."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 24, 3)).astype(np.float32) / 255
    edges = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0],
             [1, 1, 1], [1, 0, 1e-7], [0.2, 0.2, 0.2 + 1e-7], [1, 0.5, 0]]
    x[0, : len(edges)] = np.asarray(edges, np.float32)
    return x


@pytest.mark.parametrize("shift", [-0.1, -0.05, -1e-7, 0.0, 0.03, 0.1])
def test_hue_rotation_matches_the_tensor_one_for_both_signs(shift):
    # OpenCV's HSV -> RGB does not wrap negative hues: a shift added without the modulo fails here
    x = colours()
    expected = photometric._adjust_hue(planar(x), shift)[0].permute(1, 2, 0).numpy()
    assert np.abs(_adjust_hue(x.copy(), shift) - expected).max() < TOLERANCE


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
@pytest.mark.parametrize("factors", [(0.6, 0.6, 0.8, -0.1), (1.4, 1.4, 1.2, 0.1)])
def test_colour_jitter_matches_the_tensor_one_in_every_order(order, factors):
    x = colours()
    p = {"jitter": np.array([True]), "order": np.array([order]), "brightness": np.array([factors[0]]),
         "contrast": np.array([factors[1]]), "saturation": np.array([factors[2]]), "hue": np.array([factors[3]])}
    expected = photometric._color_jitter_one(planar(x), p)[0].permute(1, 2, 0).numpy()
    assert np.abs(_color_jitter(x.copy(), p, 0) - expected).max() < TOLERANCE


def draws_cover_every_step(params) -> dict:
    local = params["local"]
    return {
        "jitter": bool(local["jitter"].any()), "grayscale": bool(local["grayscale"].any()),
        "blur": bool(local["blur"].any()), "no blur": bool((~local["blur"]).any()),
        "solarize": bool(params["global2"]["solarize"].any()), "negative hue": bool((local["hue"] < 0).any()),
    }


@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_a_sample_is_the_tensor_implementation_with_the_same_draws(layout):
    """The same parameters, draw for draw, and the same crops to float32 rounding, in either memory layout."""
    gen = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    seen = {}
    for seed in range(16):
        glob = [torch.randint(0, 256, (1, 3, 40, 40), generator=gen, dtype=torch.uint8) for _ in range(2)]
        local = [torch.randint(0, 256, (1, 3, 16, 20), generator=gen, dtype=torch.uint8) for _ in range(6)]
        glob, local = ([c.contiguous(memory_format=memory_format) for c in crops] for crops in (glob, local))
        torch.manual_seed(seed)
        g_ref, l_ref, p_ref = photometric_sample(glob, local, return_params=True)
        torch.manual_seed(seed)
        g, l, p = photometric_sample_cpu(glob, local, return_params=True)
        for kind in p_ref:
            assert all(torch.equal(p[kind][k], p_ref[kind][k]) for k in p_ref[kind])
        for ours, ref in zip(g + l, g_ref + l_ref):
            assert ours.dtype == torch.float32 and ours.shape == ref.shape and ours.is_contiguous()
            assert (ours - ref).abs().max().item() < TOLERANCE / min(photometric.IMAGENET_STD)
        seen = {k: seen.get(k, False) or v for k, v in draws_cover_every_step(p).items()}
    assert all(seen.values()), seen  # every step ran in some draw


def test_float_crops_are_not_changed_and_non_default_normalisation_is_used():
    crop = torch.rand(1, 3, 12, 12)
    before = crop.clone()
    torch.manual_seed(3)
    ref = photometric_sample([crop, crop], [crop], mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    torch.manual_seed(3)
    ours = photometric_sample_cpu([crop, crop], [crop], mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert torch.equal(crop, before)
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        assert (a - b).abs().max().item() < 4 * TOLERANCE
    assert _hwc_float(crop).flags.c_contiguous


def test_bad_crops_are_refused():
    good = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="2 global crops"):
        photometric_sample_cpu([good], [])
    with pytest.raises(ValueError, match="at least 5 pixels"):
        photometric_sample_cpu([good, torch.zeros(1, 3, 4, 8, dtype=torch.uint8)], [])
    with pytest.raises(ValueError, match="one \\(1,3,H,W\\) image"):
        photometric_sample_cpu([good, torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], [])
    with pytest.raises(ValueError, match="shape"):
        photometric_sample_cpu([good, torch.zeros(1, 4, 8, 8, dtype=torch.uint8)], [])
    with pytest.raises(TypeError, match="uint8 or floating point"):
        photometric_sample_cpu([good, torch.zeros(1, 3, 8, 8, dtype=torch.int32)], [])


FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing, numpy as np, torch, cv2
    from dinoscale.data.transforms.photometric_cpu import photometric_sample_cpu, use_opencv_threads
    cv2.setNumThreads(2)
    big = np.random.rand(1500, 1500, 3).astype(np.float32)
    for _ in range(3):
        cv2.GaussianBlur(big, (9, 9), 1.5)  # the parent's pool really runs

    def child(queue):
        threads = cv2.getNumThreads()
        ok = use_opencv_threads(1)  # what a DataLoader worker does; resizing an inherited pool would hang
        crop = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
        photometric_sample_cpu([crop, crop], [crop])
        cv2.GaussianBlur(big, (9, 9), 1.5)
        queue.put((threads, ok))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,), daemon=True)
    proc.start()
    print("child", *queue.get(timeout=30))
    proc.join(30)
    print("parent", cv2.getNumThreads())
""")


def test_forked_workers_start_with_one_opencv_thread_and_never_hang():
    """A parent that used OpenCV's pool forks a worker: the worker has one thread and its calls return, and the
    parent keeps its pool size. Without the fork handler the worker's use_opencv_threads(1) hangs (measured)."""
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["child", "1", "True", "parent", "2"], done.stdout
