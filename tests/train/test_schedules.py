import math

import pytest

from dinoscale.train.schedules import build_schedules, scale_lr


def make(**overrides):
    kwargs = dict(
        total_steps=1000,
        epoch_length=100,
        base_lr=1e-3,
        min_lr=1e-6,
        warmup_epochs=1,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.992,
        final_momentum_teacher=1.0,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=3,
        freeze_last_layer_epochs=0.5,
    )
    kwargs.update(overrides)
    return build_schedules(**kwargs)


def test_lr_warmup_then_cosine():
    s = make()
    assert s.at(0)["lr"] == 0.0
    assert s.at(50)["lr"] == pytest.approx(5e-4, rel=1e-12)
    assert s.at(99)["lr"] == pytest.approx(0.99e-3, rel=1e-12)
    assert s.at(100)["lr"] == pytest.approx(1e-3, rel=1e-12)  # warmup end = cosine start = peak
    # cosine midpoint: halfway between 100 and 1000
    assert s.at(550)["lr"] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-12)
    assert s.at(999)["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * 899 / 900)) / 2)
    assert s.at(1000)["lr"] == 1e-6
    assert s.at(10**6)["lr"] == 1e-6


def test_lr_curve_matches_closed_form_everywhere():
    s = make()
    for step in range(0, 1001):
        if step < 100:
            expected = 1e-3 * step / 100
        else:
            expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * (step - 100) / 900))
        assert s.at(step)["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        if step > 100:
            assert s.at(step)["lr"] <= s.at(step - 1)["lr"]


def test_weight_decay_and_momentum_cosine_over_whole_run():
    s = make()
    assert s.at(0)["wd"] == pytest.approx(0.04)
    assert s.at(500)["wd"] == pytest.approx(0.22)
    assert s.at(250)["wd"] == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.at(1000)["wd"] == pytest.approx(0.4)
    assert s.at(0)["momentum"] == pytest.approx(0.992)
    assert s.at(500)["momentum"] == pytest.approx(0.996)
    assert s.at(1000)["momentum"] == 1.0
    assert s.at(5000)["momentum"] == 1.0


def test_teacher_temperature_warmup_then_constant():
    s = make()
    assert s.at(0)["teacher_temp"] == pytest.approx(0.04)
    assert s.at(150)["teacher_temp"] == pytest.approx(0.055)
    assert s.at(299)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 299 / 300)
    assert s.at(300)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(900)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(2000)["teacher_temp"] == pytest.approx(0.07)


def test_teacher_temperature_warmup_longer_than_run_holds_value_at_end():
    s = make(total_steps=200, warmup_teacher_temp_epochs=4, warmup_epochs=1)
    assert s.at(200)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 200 / 400)
    assert s.at(300)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 200 / 400)


def test_last_layer_frozen_then_follows_lr():
    s = make()
    for step in (0, 10, 49):
        assert s.at(step)["last_layer_lr"] == 0.0
        assert s.at(step)["lr"] == pytest.approx(1e-3 * step / 100)
    for step in (50, 100, 550, 1000, 1500):
        assert s.at(step)["last_layer_lr"] == s.at(step)["lr"]
    assert s.at(50)["last_layer_lr"] > 0


def test_boundaries_exact_on_million_step_runs():
    # fvcore's CompositeParamScheduler would switch pieces one step early here (its 1e-6 tolerance).
    s = make(total_steps=2_000_000, epoch_length=1000, warmup_epochs=10, freeze_last_layer_epochs=10)
    assert s.at(9_999)["last_layer_lr"] == 0.0
    assert s.at(10_000)["last_layer_lr"] == pytest.approx(1e-3)
    assert s.at(9_999)["lr"] == pytest.approx(1e-3 * 9_999 / 10_000, rel=1e-12)


def test_schedules_depend_on_total_steps_only_not_on_when_the_run_stops():
    full = make()
    # A run stopped early with max_steps=300 uses the same schedule object: the value at its last step is the
    # full run's, mid-cosine, not the end value.
    assert full.at(299)["lr"] > 1e-4
    assert full.at(299)["wd"] < 0.2
    # Evaluation is pure: order and repetition do not matter (a resumed run asks for later steps first).
    forward = [full.at(k) for k in range(0, 1000, 37)]
    backward = [full.at(k) for k in reversed(range(0, 1000, 37))][::-1]
    assert forward == backward
    assert make().at(299) == full.at(299)
    # A longer scheduled run gives different values at the same step.
    assert make(total_steps=2000).at(299)["lr"] != full.at(299)["lr"]


def test_zero_warmup_and_values_are_floats():
    s = make(warmup_epochs=0, freeze_last_layer_epochs=0, warmup_teacher_temp_epochs=0)
    values = s.at(0)
    assert values["lr"] == pytest.approx(1e-3)
    assert values["last_layer_lr"] == pytest.approx(1e-3)
    assert values["teacher_temp"] == pytest.approx(0.07)
    assert all(type(v) is float for v in values.values())
    assert set(values) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="warmup_epochs"):
        make(warmup_epochs=11)
    with pytest.raises(ValueError, match="total_steps"):
        make(total_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        make(momentum_teacher=1.5)
    with pytest.raises(ValueError, match="step"):
        make().at(-1)


def test_scale_lr_sqrt_rule():
    assert scale_lr(0.004, 1024) == pytest.approx(0.004)
    assert scale_lr(0.004, 256) == pytest.approx(0.002)
    assert scale_lr(0.004, 4096) == pytest.approx(0.008)
    with pytest.raises(ValueError):
        scale_lr(0.004, 0)


def test_constant_shape_is_dinov3s():
    # DINOv3: the lr warms up as before, then stays at its peak; wd and teacher momentum never move; the
    # temperature still warms up. The DINOv2 end values (min_lr, weight_decay_end, final momentum) are unused.
    s = make(shape="constant")
    assert s.at(0)["lr"] == 0.0 and s.at(50)["lr"] == pytest.approx(5e-4, rel=1e-12)
    assert [s.at(t)["lr"] for t in (100, 550, 999, 1000, 10**6)] == [1e-3] * 5
    assert {s.at(t)["wd"] for t in (0, 500, 1000, 10**6)} == {0.04}
    assert {s.at(t)["momentum"] for t in (0, 500, 1000, 10**6)} == {0.992}
    assert s.at(150)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 150 / 300) and s.at(300)["teacher_temp"] == 0.07
    assert s.at(49)["last_layer_lr"] == 0.0 and s.at(50)["last_layer_lr"] == s.at(50)["lr"]
    with pytest.raises(ValueError, match="shape"):
        make(shape="linear")


def test_gram_loss_weight_warmup_cosine_constant():
    s = make(gram_loss_weight={"start": 0.0, "peak": 1.0, "end": 3.0, "warmup_epochs": 1, "cosine_epochs": 2})
    assert s.at(0)["gram_loss_weight"] == 0.0 and s.at(50)["gram_loss_weight"] == pytest.approx(0.5)
    assert s.at(100)["gram_loss_weight"] == 1.0  # the peak, where the cosine starts
    assert s.at(200)["gram_loss_weight"] == pytest.approx(2.0)  # the cosine's midpoint
    assert [s.at(t)["gram_loss_weight"] for t in (300, 999, 10**6)] == [3.0] * 3
    assert make(gram_loss_weight=0.25).at(10)["gram_loss_weight"] == 0.25
    assert "gram_loss_weight" not in make().at(10)
