"""The peak FLOP/s (dinoscale.train.perf.peak): the GPU table, the CPU matmul probe and its cache."""

import json
import os

import pytest
import torch

from dinoscale.train.perf import peak


def test_cpu_peak_probe_is_positive_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    monkeypatch.setitem(peak._PROBE_SIZE, "cpu", 256)  # the real probe uses 2048; the logic is the same
    value, source = peak.peak_flops("cpu", torch.float32, cache_path=cache)
    assert value > 0 and "measured now" in source
    stored = json.loads(cache.read_text())
    (key,) = stored
    assert key.endswith("|fp32") and f"threads={torch.get_num_threads()}" in key
    assert stored[key] == value

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again although the figure is cached")

    monkeypatch.setattr(peak, "_measure_matmul", no_probe)
    again, source = peak.peak_flops("cpu", torch.float32, cache_path=cache)
    assert again == value and "cached" in source
    # another dtype is another entry
    monkeypatch.undo()
    monkeypatch.setitem(peak._PROBE_SIZE, "cpu", 256)
    bf16, _ = peak.peak_flops("cpu", torch.bfloat16, cache_path=cache)
    assert bf16 > 0 and len(json.loads(cache.read_text())) == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H200", torch.float16, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A10", torch.bfloat16, 125e12),
        ("NVIDIA L40S", torch.float32, 91.6e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
    ],
)
def test_gpu_table(monkeypatch, tmp_path, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    value, source = peak.peak_flops("cuda", dtype, cache_path=tmp_path / "unused.json")
    assert value == expected and source.startswith("table") and name in source
    assert not (tmp_path / "unused.json").exists()


def test_gpu_table_uses_tf32_when_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert peak.peak_flops("cuda", torch.float32)[0] == 156e12
        torch.set_float32_matmul_precision("highest")
        assert peak.peak_flops("cuda", torch.float32)[0] == 19.5e12
    finally:
        torch.set_float32_matmul_precision(previous)


def test_peak_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        peak.peak_flops("cpu", torch.int8)
    with pytest.raises(ValueError, match="device type"):
        peak.peak_flops("meta", torch.float32)


def test_a_lower_probe_never_lowers_the_cached_peak(tmp_path, monkeypatch):
    """A probe on a busy machine reads low; the cache keeps the best figure, a faster probe raises it."""
    cache = tmp_path / "peak.json"
    probes = iter([4e11, 1e11, 9e11])
    monkeypatch.setattr(peak, "_measure_matmul", lambda *args, **kwargs: next(probes))
    first, _ = peak.peak_flops("cpu", torch.bfloat16, cache_path=cache)
    busy, source = peak.peak_flops("cpu", torch.bfloat16, cache_path=cache, refresh=True)
    assert (first, busy) == (4e11, 4e11) and "1e+11" in source
    idle, _ = peak.peak_flops("cpu", torch.bfloat16, cache_path=cache, refresh=True)
    assert idle == 9e11 and list(json.loads(cache.read_text()).values()) == [9e11]
