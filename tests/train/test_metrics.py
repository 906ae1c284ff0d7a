import json
import math

import pytest
import torch

from dinoscale.train import metrics as metrics_module
from dinoscale.train.metrics import MetricLogger, console_line, read_metrics


class FakeTime:
    """Replaces the metrics module's ``time``: perf_counter is set by the test."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def time(self):
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(metrics_module, "time", fake)
    return fake


def run(tmp_path, steps, *, start_step=0, total_steps=12, loss_offset=0.0, clock=None, seconds_per_step=1.0, **kw):
    logger = MetricLogger(
        tmp_path, total_steps=total_steps, log_every=5, tensorboard=False, start_step=start_step, **kw
    )
    for step in steps:
        if clock is not None:
            clock.now += seconds_per_step
        logger.log(step, {"loss": torch.tensor(step + loss_offset), "lr": 0.5 * step}, n_images=4)
    logger.close()
    return read_metrics(tmp_path / "metrics.jsonl")


def test_rows_written_at_log_steps_and_last_step(tmp_path, clock):
    rows = run(tmp_path, range(1, 13), clock=clock)  # step = optimizer steps completed
    assert [r["step"] for r in rows] == [5, 10, 12]
    assert list(rows[0]) == ["step", "loss", "lr", "images_per_s", "eta_s", "time"]
    assert rows[0]["loss"] == 5.0 and rows[0]["lr"] == 2.5
    assert all(isinstance(r["loss"], float) for r in rows)
    assert rows[1]["time"] == 1_700_000_000.0 + 10.0  # 10 fake seconds after the logger was made
    assert rows[2]["eta_s"] == 0.0
    # every line is strict JSON
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_images_per_second_and_eta(tmp_path, clock):
    logger = MetricLogger(tmp_path, total_steps=25, log_every=10, tensorboard=False)
    for step in range(1, 11):
        clock.now += 0.5  # first window: 10 steps of 0.5 s, 8 images each
        logger.log(step, {"loss": 1.0}, n_images=8)
    for step in range(11, 21):
        clock.now += 3.0  # second window: 10 steps of 3 s, 32 images each
        logger.log(step, {"loss": 1.0}, n_images=32)
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["images_per_s"] == pytest.approx(80 / 5.0)
    assert rows[0]["eta_s"] == pytest.approx(0.5 * 15)  # 15 steps left at the window's 0.5 s per step
    assert rows[1]["images_per_s"] == pytest.approx(320 / 30.0)
    assert rows[1]["eta_s"] == pytest.approx(3.0 * 5)


def test_console_lines(tmp_path, clock, capsys):
    run(tmp_path, range(1, 11), clock=clock, progress_bar=False)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "step 5/12 | loss 5 | lr 2.5e+00 | 4 img/s | eta 0:00:07",
        "step 10/12 | loss 10 | lr 5.0e+00 | 4 img/s | eta 0:00:02",
    ]


def test_progress_bar_mode(tmp_path, clock, capsys):
    rows = run(tmp_path, range(1, 13), clock=clock, progress_bar=True)
    out = capsys.readouterr().out
    assert "12/12" in out and "loss 12 | lr 6.0e+00 | 4 img/s" in out
    assert [r["step"] for r in rows] == [5, 10, 12]


def loop_metrics(**changes):
    """One log step's metrics, with the names and order ``dinoscale.train.loop.log_step`` gives them."""
    values = {"data/corrupt_samples": 0.0, "data/bad_shards": 0.0, "data/padded_samples": 0.0,
              "perf/tflops_per_s": 0.4, "perf/mfu": 0.22, "loss": 10.2134, "loss/dino_local": 5.1,
              "loss/dino_global": 5.0, "loss/koleo": -0.08, "loss/ibot": 0.19, "lr": 0.0004, "wd": 0.04,
              "momentum": 0.992, "teacher_temp": 0.04, "grad_norm": 1.7, "skipped_steps_in_a_row": 0.0}
    assert set(changes) <= set(values)
    return {**values, **changes}


def test_console_line_shows_loss_lr_speed_eta_and_only_what_is_abnormal():
    assert console_line(loop_metrics(), 531.7, 192.4) == "loss 10.21 | lr 4.0e-04 | 532 img/s | eta 0:03:12"
    assert console_line(loop_metrics(), 0.374, 3600 * 30) == "loss 10.21 | lr 4.0e-04 | 0.37 img/s | eta 1 day, 6:00:00"
    damaged = loop_metrics(**{"data/corrupt_samples": 3.0, "data/padded_samples": 5.0, "skipped_steps_in_a_row": 2.0,
                              "grad_norm": math.inf, "loss/koleo": math.nan, "loss": math.nan})
    assert console_line(damaged, 531.7, 192.4) == (
        "loss nan | lr 4.0e-04 | 532 img/s | eta 0:03:12 | data/corrupt_samples 3 | data/padded_samples 5 | "
        "skipped_steps_in_a_row 2 | non-finite loss/koleo, grad_norm")


def test_console_line_is_short_while_the_file_and_tensorboard_get_every_metric(tmp_path, clock, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricLogger(tmp_path, total_steps=400, log_every=20, tensorboard=True, progress_bar=False,
                          start_step=100)
    for step in range(101, 121):
        clock.now += 0.5
        logger.log(step, loop_metrics(**{"data/bad_shards": 1.0}), n_images=256)
    logger.close()
    line = capsys.readouterr().out.strip()
    assert line == "step 120/400 | loss 10.21 | lr 4.0e-04 | 512 img/s | eta 0:02:20 | data/bad_shards 1"
    assert len(console_line(loop_metrics(), 99999.0, 9e5)) < 100  # what a healthy long run prints after the step
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert {k: v for k, v in row.items() if k not in ("step", "images_per_s", "eta_s", "time")} == loop_metrics(
        **{"data/bad_shards": 1.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(loop_metrics()) | {"perf/images_per_s"}
    assert acc.Scalars("loss/koleo")[-1].value == pytest.approx(-0.08)


class RecordingTracker:
    name = "recording"
    run_id = "r1"

    def __init__(self, fail_at=None):
        self.logged, self.closed, self.fail_at = [], 0, fail_at

    def log(self, step, values):
        if step == self.fail_at:
            raise ConnectionError("server went away")
        self.logged.append((step, dict(values)))

    def close(self):
        self.closed += 1


def test_trackers_get_what_tensorboard_gets_and_are_closed_with_the_logger(tmp_path, clock, caplog):
    good, failing = RecordingTracker(), RecordingTracker(fail_at=10)
    logger = MetricLogger(tmp_path, total_steps=12, log_every=5, tensorboard=False, progress_bar=False,
                          trackers=[good, failing])
    for step in range(1, 13):
        clock.now += 1.0
        logger.log(step, {"loss": torch.tensor(float(step)), "lr": 0.5}, n_images=4)
    logger.log_event(12, {"type": "eval", "knn/top1@20": 55.5, "note": "text is not a scalar"})
    logger.close()
    assert good.logged == [(5, {"loss": 5.0, "lr": 0.5, "perf/images_per_s": 4.0}),
                           (10, {"loss": 10.0, "lr": 0.5, "perf/images_per_s": 4.0}),
                           (12, {"loss": 12.0, "lr": 0.5, "perf/images_per_s": 4.0}),
                           (12, {"knn/top1@20": 55.5})]
    # the failing one was dropped at step 10 (closed then), the run and the other tracker went on
    assert [s for s, _ in failing.logged] == [5] and failing.closed == 1 and good.closed == 1
    assert "recording tracker failed at step 10 (ConnectionError: server went away)" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10, 12, 12]


def test_non_log_steps_do_not_touch_the_metrics(tmp_path):
    logger = MetricLogger(tmp_path, total_steps=100, log_every=10, tensorboard=False, progress_bar=False)
    # a value that could not be logged is never looked at on a non-log step
    logger.log(3, {"loss": torch.ones(5)}, n_images=4)
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
        logger.log(10, {"loss": torch.ones(5)}, n_images=4)
    with pytest.raises(ValueError, match="reserved"):
        logger.log(20, {"images_per_s": 1.0}, n_images=4)
    with pytest.raises(TypeError, match="'note'"):
        logger.log(30, {"note": "hello"}, n_images=4)
    logger.close()


def test_resume_drops_rows_from_the_interrupted_run(tmp_path, clock, capsys):
    # the first attempt logged up to step 12 (and an event at 11), then crashed; its last checkpoint is step 5
    logger = MetricLogger(tmp_path, total_steps=15, log_every=5, tensorboard=False)
    for step in range(1, 13):
        logger.log(step, {"loss": torch.tensor(float(step))}, n_images=4)
    logger.log_event(11, {"type": "eval", "knn/top1@20": 50.0})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 1')  # a line cut short by the crash
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10, 11]

    logger = MetricLogger(tmp_path, total_steps=15, log_every=5, tensorboard=False, start_step=5)
    assert "kept 1 rows up to step 5, dropped 2 rows of an earlier attempt and 1 unreadable" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5]
    for step in range(6, 16):
        logger.log(step, {"loss": torch.tensor(100.0 + step)}, n_images=4)
    logger.log_event(15, {"type": "eval", "knn/top1@20": 55.5})
    logger.close()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 15]
    assert [r["loss"] for r in rows[:3]] == [5.0, 110.0, 115.0]  # the kept row, then the resumed run's rows
    assert rows[3]["type"] == "eval" and rows[3]["knn/top1@20"] == 55.5
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_fresh_start_clears_a_previous_file_and_resume_at_end_keeps_everything(tmp_path):
    run(tmp_path, range(1, 13))
    kept = run(tmp_path, [], start_step=12)
    assert [r["step"] for r in kept] == [5, 10, 12]
    fresh = run(tmp_path, range(1, 6), loss_offset=1000.0)
    assert [(r["step"], r["loss"]) for r in fresh] == [(5, 1005.0)]


def test_events(tmp_path, capsys):
    logger = MetricLogger(tmp_path, total_steps=100, tensorboard=False, progress_bar=False)
    logger.log_event(40, {"type": "skipped_step", "loss": torch.tensor(float("nan")), "reason": "non-finite loss"})
    logger.log_event(50, {"knn/top1@20": torch.tensor(71.25)})
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["type"] == "skipped_step" and rows[0]["loss"] is None and rows[0]["reason"] == "non-finite loss"
    assert rows[1]["type"] == "event" and rows[1]["knn/top1@20"] == 71.25 and rows[1]["step"] == 50
    assert "step 50 [event] knn/top1@20 71.25" in capsys.readouterr().out


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "run", total_steps=10, enabled=False)
    logger.log(0, {"loss": torch.ones(3)}, n_images=4)  # not even looked at
    logger.log_event(0, {"type": "eval", "acc": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_nan_metric_becomes_null(tmp_path):
    with MetricLogger(tmp_path, total_steps=1, tensorboard=False, progress_bar=False) as logger:
        logger.log(1, {"loss": torch.tensor(float("inf")), "lr": math.nan}, n_images=1)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["loss"] is None and rows[0]["lr"] is None


def test_tensorboard_scalars(tmp_path, clock):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricLogger(tmp_path, total_steps=12, log_every=5, tensorboard=True, progress_bar=False)
    for step in range(1, 13):
        clock.now += 1.0
        logger.log(step, {"loss/dino": torch.tensor(float(step))}, n_images=2)
    logger.log_event(12, {"type": "eval", "knn/top1": 42.0})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"loss/dino", "perf/images_per_s", "knn/top1"} <= set(scalars)
    assert [(e.step, e.value) for e in acc.Scalars("loss/dino")] == [(5, 5.0), (10, 10.0), (12, 12.0)]
    assert acc.Scalars("perf/images_per_s")[1].value == pytest.approx(2.0)


def test_tensorboard_resume_purges_steps_of_the_interrupted_run(tmp_path, clock):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for start, offset in ((0, 0.0), (5, 100.0)):
        logger = MetricLogger(tmp_path, total_steps=12, log_every=5, start_step=start, progress_bar=False)
        for step in range(start + 1, 13):
            clock.now += 1.0
            logger.log(step, {"loss": torch.tensor(step + offset)}, n_images=2)
        logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(5, 5.0), (10, 110.0), (12, 112.0)]


def test_append_jsonl_after_close(tmp_path):
    run(tmp_path, range(1, 6))
    MetricLogger.append_jsonl(tmp_path / "metrics.jsonl", {"type": "final_knn", "step": 5, "teacher": torch.tensor(0.5),
                                                           "random_init": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1] == {"type": "final_knn", "step": 5, "teacher": 0.5, "random_init": None}
