"""benchmarks/step_breakdown.py: its timed linear layer computes what ``F.linear`` computes, values and gradients,
with and without autocast; a run prints a row for every part of every layer and puts ``F.linear`` back."""

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def sb(load_benchmark):
    return load_benchmark("step_breakdown")


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_timed_linear_matches_f_linear(sb, autocast, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    grad = torch.randn(2, 7, 24)
    results = []
    for fn in (F.linear, sb.timed_linear):
        for t in (x, weight, b):
            if t is not None:
                t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x, weight, b)
        out.backward(grad)
        results.append([out.detach().float(), x.grad, weight.grad] + ([b.grad] if bias else []))
    for ours, ref in zip(*results):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=2e-2 if autocast else 1e-5, atol=2e-2 if autocast else 1e-5)


def test_flops_of_counts_the_matmuls(sb):
    assert sb.flops_of(("linear", (24, 16), "forward"), ((10, 16),)) == 2 * 10 * 16 * 24
    assert sb.flops_of(("linear", (24, 16), "db"), ((10, 16),)) == 0
    qkv = (3, 12, 50, 64)
    assert sb.flops_of(("attention", qkv, "forward"), (qkv,)) == 2 * (2 * 12 * 50 * 50 * 64)
    assert sb.flops_of(("attention", qkv, "backward"), (qkv,)) == 4 * (2 * 12 * 50 * 50 * 64)


def test_prints_every_part_and_restores_linear(sb, capsys):
    linear = F.linear
    sb.main(["--batch", "1", "--steps", "1", "--warmup", "0", "--reps", "1"])
    assert F.linear is linear
    out = capsys.readouterr().out
    rows = [line.split(")")[-1].split()[0] for line in out.splitlines() if line.startswith("linear (")]
    # ViT-S/14: four linear layers, each with forward, dX, dW and db
    assert sorted(rows) == sorted(["forward", "dX", "dW", "db"] * 4), out
    assert sum(line.startswith("attention N=") for line in out.splitlines()) == 4, out  # 2 sizes x fwd/bwd
    assert "all linear" in out and "the rest of the instrumented step" in out
    # the ceiling is the sum of the "alone" column, as a share of the peak
    alone = sum(float(line.split()[-2]) for line in out.splitlines()
                if line.startswith("all "))
    ceiling = next(line for line in out.splitlines() if line.startswith("ceiling:"))
    assert abs(float(ceiling.split(": ")[-1].split(" ms")[0]) - alone) < 0.2, (ceiling, alone)
    assert ceiling.endswith("% of the peak")
