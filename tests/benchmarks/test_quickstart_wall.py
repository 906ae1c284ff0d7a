"""benchmarks/quickstart_wall.py: the summary of a metrics.jsonl (medians over the log rows only, the final kNN
row), the report lines, and the process-tree memory sampler on real child processes."""

import json
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def qw(load_benchmark):
    return load_benchmark("quickstart_wall")


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")


def test_summary_takes_medians_of_log_rows_and_the_final_knn(qw, tmp_path):
    rows = [
        {"step": 20, "perf/tflops_per_s": 0.09, "perf/mfu": 0.21, "loss": 9.7, "images_per_s": 120.0},
        {"step": 40, "perf/tflops_per_s": 0.10, "perf/mfu": 0.25, "loss": 9.1, "images_per_s": 140.0},
        {"type": "eval", "step": 40, "knn/top1@20": 70.0, "images_per_s": 1.0},  # not a training rate
        {"step": 60, "perf/tflops_per_s": 0.11, "perf/mfu": 0.27, "loss": 9.3, "images_per_s": 150.0},
        {"step": 80, "loss": 9.0, "images_per_s": 130.0},  # a row without perf keys still counts for images/s
        {"type": "final_knn", "step": 80, "teacher": 75.07, "random_init": 66.81},
    ]
    _write(tmp_path / "metrics.jsonl", rows)
    s = qw.summarize_metrics(tmp_path / "metrics.jsonl")
    assert s["log_rows"] == 4 and s["last_step"] == 80
    assert s["images_per_s"] == pytest.approx(135.0)  # median of 120, 140, 150, 130
    assert s["mfu"] == pytest.approx(0.25)  # median of the three rows that have it
    assert s["tflops_per_s"] == pytest.approx(0.10)
    assert s["final_knn"] == {"teacher": 75.07, "random_init": 66.81}
    lines = qw.report({"wall_s": 238.4, "returncode": 0, "peak_tree_bytes": 1.7e9,
                       "peak_single_process_bytes": 1.5e9, "knn_line": "knn@20 teacher=75.07% random_init=66.81%"}, s)
    text = "\n".join(lines)
    assert "3 min 58 s" in text and "1.70 GB" in text and "135.0 images/s" in text and "25.0%" in text
    assert "knn@20 teacher=75.07%" in text


def test_summary_of_a_run_without_rows(qw, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    s = qw.summarize_metrics(tmp_path / "metrics.jsonl")
    assert s == {"log_rows": 0, "last_step": None, "images_per_s": None, "mfu": None, "tflops_per_s": None,
                 "final_knn": None}
    assert any("-" in line for line in qw.report({"wall_s": 5, "returncode": 1, "peak_tree_bytes": 0,
                                                   "peak_single_process_bytes": 0, "knn_line": None}, s))


def test_tree_memory_counts_the_children(qw):
    # a parent holding ~200 MB that starts a child holding another ~200 MB of its own (not shared)
    code = ("import subprocess, sys, time; a = bytearray(200_000_000); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(200_000_000); time.sleep(30)']); "
            "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and qw.tree_memory_bytes(proc.pid) < 380e6:
            time.sleep(0.1)
        total = qw.tree_memory_bytes(proc.pid)
        assert 380e6 < total < 600e6, total
        assert qw._memory_bytes(proc.pid) < 300e6  # the parent alone holds about half of it
    finally:
        for child in qw._children(proc.pid):
            subprocess.run(["kill", str(child)])
        proc.kill()
        proc.wait()
    assert qw.tree_memory_bytes(proc.pid) == 0  # gone
