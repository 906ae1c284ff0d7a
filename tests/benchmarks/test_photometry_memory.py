"""benchmarks/photometry_memory.py: the bandwidth rows, the functions it times inside the pipeline (put back
afterwards), and its printed report."""

import pytest
import torch

import dinoscale.data.transforms.photometric as photometric


@pytest.fixture(scope="module")
def pm(load_benchmark):
    return load_benchmark("photometry_memory")


@pytest.fixture(scope="module")
def photos():
    """Three of the photos tools/bench_data.py uses, as JPEG bytes (its ``load_photos`` would call scikit-image
    loaders that download, which scikit-image turns into a skip under pytest)."""
    import io

    from PIL import Image
    from skimage import data

    out = []
    for pixels in (data.astronaut(), data.chelsea(), data.coffee()):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def test_l2_size_is_read_or_assumed(pm):
    size, from_sysfs = pm.l2_bytes()
    assert size >= 64 * 1024
    assert from_sysfs or size == pm.DEFAULT_L2_BYTES


def test_bandwidth_has_a_row_in_and_beyond_l2(pm):
    rows = pm.bandwidth(256 * 1024, reps=2)
    assert [r["working set"] for r in rows] == ["in L2", "beyond L2"]
    assert rows[0]["bytes"] <= 128 * 1024 and rows[1]["bytes"] >= 15 * 256 * 1024
    assert all(r["add_us"] > 0 and r["mul_us"] > 0 for r in rows)


def test_pipeline_times_each_function_and_puts_it_back(pm, photos):
    originals = {name: getattr(photometric, name) for name in pm.TIMED}
    rows, ms_per_image = pm.pipeline(photos, passes=1, reps=2)
    assert {name: getattr(photometric, name) for name in pm.TIMED} == originals
    assert ms_per_image > 0
    timed = {r["function"] for r in rows}
    assert {"_planar_float", "_adjust_hue"} <= timed  # every image's crops are converted; 3 images: some jitter
    for r in rows:
        assert 1 <= r["sampled"] <= pm.SAMPLED_CALLS and r["inside_us"] > 0 and r["alone_us"] > 0
    # two global crops per image, each converted once
    assert next(r for r in rows if r["function"] == "_planar_float" and r["shape"] == (1, 3, 224, 224))[
        "calls_per_image"] == 2


def test_timers_leave_the_crops_unchanged(pm, photos):
    """The timers keep copies of the inputs: the augmentation gives the same crops with them as without."""
    from dinoscale.data.transforms.multicrop import MultiCropAugmentation

    augment = MultiCropAugmentation(photometry_backend="torch")  # the pipeline's; OpenCV's calls none of them
    torch.manual_seed(3)
    plain = [augment(data) for data in photos]
    calls, sampled = {}, {}
    with pm.timers(calls, sampled):
        torch.manual_seed(3)
        timed = [augment(data) for data in photos]
    assert calls[("_planar_float", (1, 3, 224, 224))] == 2 * len(photos)
    assert all(len(v) == min(calls[k], pm.SAMPLED_CALLS) for k, v in sampled.items())
    for a, b in zip(plain, timed):
        for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
            assert torch.equal(x, y)


def test_prints_both_parts(pm, photos, capsys, monkeypatch):
    import bench_data

    monkeypatch.setattr(bench_data, "load_photos", lambda: [(str(i), data) for i, data in enumerate(photos)])
    pm.main(["--passes", "1", "--photos", "2", "--reps", "2"])
    out = capsys.readouterr().out
    assert "in L2" in out and "beyond L2" in out
    assert "_planar_float" in out and "inside/alone" in out
