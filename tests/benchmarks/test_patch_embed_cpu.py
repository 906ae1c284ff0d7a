"""benchmarks/patch_embed_cpu.py: the two forms it times are the same map (float rounding apart), and it prints a
row per case and dtype."""

import pytest


@pytest.fixture(scope="module")
def pe(load_benchmark):
    return load_benchmark("patch_embed_cpu")


def test_forms_compute_the_same_map(pe):
    for autocast, tolerance in ((False, 1e-4), (True, 0.1)):
        result = pe.run_case("quickstart", autocast, rounds=1, warmup=0)
        assert result["diff"] < tolerance, (autocast, result["diff"])
        assert result["conv"][0] > 0 and result["linear"][1] > 0


def test_prints_a_row_per_case_and_dtype(pe, capsys):
    pe.main(["--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["quickstart"], ["vits14"])]
    assert rows == [["quickstart", "bf16"], ["quickstart", "fp32"], ["vits14", "bf16"], ["vits14", "fp32"]], out
