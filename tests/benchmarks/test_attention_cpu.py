"""benchmarks/attention_cpu.py: its three kernels compute the same function from the same inputs, the float32-score
kernels (ours, fused) measurably closer to float64 than bf16 matmuls, and the script prints a row for each."""

import pytest
import torch


@pytest.fixture(scope="module")
def ac(load_benchmark):
    return load_benchmark("attention_cpu")


def test_kernels_agree_and_rank_by_accuracy(ac):
    sets = [[t[:1] for t in s] for s in ac.make_inputs(batch=1)]  # one crop of each size
    reference = ac.call(ac.math_attention, sets, torch.float64)
    errors = {name: ac.relative_errors(ac.call(fn, sets, torch.bfloat16), reference) for name, fn in ac.KERNELS.items()}
    for name, e in errors.items():
        assert max(e) < 0.03, (name, e)  # the same function, at bf16 accuracy
    for ours, fused, bf16 in zip(errors["ours"], errors["fused"], errors["bf16 matmuls"]):
        assert ours <= 1.1 * fused
        assert bf16 >= 1.3 * ours  # scores rounded to bf16: the difference the benchmark shows


def test_prints_a_row_per_kernel(ac, capsys):
    ac.main(["--batch", "1", "--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["ours"], ["fused"], ["bf16"])]
    assert rows == ["ours", "fused", "bf16"], out
