"""benchmarks/small_image_crops.py: both forms it times cut the same crops (within the kernel's rounding), and it
prints a row per image size."""

import pytest


@pytest.fixture(scope="module")
def sic(load_benchmark):
    return load_benchmark("small_image_crops")


def test_forms_cut_the_same_crops(sic):
    for side in sic.CASES:
        result = sic.run_case(side, rounds=1, warmup=0)
        assert result["largest"] <= 2 and result["share"] < 0.01, (side, result)
        assert result["kernel"] > 0 and result["matmul"] > 0
        assert result["used"] == (side <= 48)


def test_prints_a_row_per_size(sic, capsys):
    sic.main(["--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] and line.split()[0].endswith("px")]
    assert rows == ["28px", "32px", "48px", "64px"], out
    assert "torchvision" in out.splitlines()[-1]
