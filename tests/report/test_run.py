"""Reading a run directory: the status, steps, exports and counts of finished, partial and broken runs."""

import json

import pytest
from omegaconf import OmegaConf

from dinoscale.config import load_config
from dinoscale.report.run import NotARunError, RunSummary, format_duration, read_run
from dinoscale.train.build import planned_steps


def test_finished_run(tiny_run):
    run = read_run(tiny_run)
    assert run.status() == "finished" and run.finished
    assert run.last_step == 4 and run.planned_steps == 4
    assert [p.name for p in run.checkpoints] == ["step_000000002", "step_000000004"]
    assert sorted(p.name for p in run.exports) == ["teacher_backbone.pth", "teacher_backbone.safetensors"]
    assert set(run.final_knn) >= {"teacher", "random_init"} and run.final_knn["step"] == 4
    assert run.data_problem_totals() == {"corrupt_samples": 0, "bad_shards": 0, "padded_samples": 0}
    assert run.skipped_steps == [] and run.unreadable_lines == 0
    # config.yaml is written before the first step, the final kNN row after the last
    assert 0 < run.wall_time() < 3600


def test_crashed_run_with_a_torn_last_line(run_copy):
    metrics = run_copy / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    kept = [r for r in rows if r["step"] <= 2 and r.get("type") != "final_knn"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 3, "loss": 6.')
    _remove_export(run_copy)
    run = read_run(run_copy)
    assert not run.finished and run.final_knn is None and run.exports == []
    assert run.last_step == 2 and run.unreadable_lines == 1
    assert run.status().startswith("incomplete: step 2 of 4; last write ")


def test_run_that_logged_nothing_yet(run_copy):
    (run_copy / "metrics.jsonl").unlink()
    run = read_run(run_copy)
    assert run.rows == [] and run.last_step is None
    assert run.status().startswith("incomplete: no step logged yet")


def _remove_export(run_dir):
    for path in (run_dir / "export").iterdir():
        path.unlink()


def test_stopped_after_too_many_bad_steps(run_copy):
    metrics = run_copy / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines() if "final_knn" not in line]
    # as SkippedStepReview logs them, up to the limit train.max_consecutive_bad_steps (10)
    lines += [json.dumps({"step": 4 + k, "type": "skipped_step", "loss": None, "grad_norm": None,
                          "consecutive_bad_steps": k}) for k in range(1, 11)]
    metrics.write_text("\n".join(lines) + "\n")
    _remove_export(run_copy)
    run = read_run(run_copy)
    assert len(run.skipped_steps) == 10
    assert run.status() == "stopped after 10 consecutive non-finite steps (step 4 of 4)"


def test_data_problem_counts_add_up_over_resumes(tiny_run):
    # The loader counts since it was built: a resume starts again from 0.
    rows = [{"step": s, "data/corrupt_samples": c, "data/bad_shards": 0.0} for s, c in
            [(1, 1.0), (2, 3.0), (3, 0.0), (4, 2.0), (5, 1.0), (6, 4.0)]]
    run = RunSummary(run_dir=tiny_run, config=OmegaConf.create({}), config_text="", rows=rows)
    assert run.data_problem_totals() == {"corrupt_samples": 3.0 + 2.0 + 4.0, "bad_shards": 0.0}


def test_planned_steps_is_the_scheduled_length_or_max_steps():
    assert planned_steps(load_config("quickstart")) == 4 * 100
    assert planned_steps(load_config("quickstart", ["train.max_steps=40"])) == 40
    assert planned_steps(load_config("quickstart", ["train.max_steps=4000"])) == 400


def test_not_a_run(tmp_path):
    with pytest.raises(NotARunError, match="no config.yaml"):
        read_run(tmp_path)
    with pytest.raises(NotARunError, match="is not a directory"):
        read_run(tmp_path / "missing")
    (tmp_path / "config.yaml").write_text("- a list\n- not a config\n")
    with pytest.raises(NotARunError, match="not a config mapping"):
        read_run(tmp_path)


def test_format_duration():
    assert format_duration(59.6) == "1:00"
    assert format_duration(3 * 3600 + 62) == "3:01:02"
    assert format_duration(0) == "0:00"
