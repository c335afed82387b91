"""Schedules of DESIGN section 7 at their switch points."""

from __future__ import annotations

import math

import pytest

from quantlm.train.schedule import Schedule


def test_floatlm_warmup_then_cosine():
    s = Schedule("floatlm", total_steps=110, warmup_steps=10, peak_lr=(1e-3, 1e-3), weight_decay=0.1, min_ratio=0.1)
    assert s.lr(0) == pytest.approx(1e-4)
    assert s.lr(9) == pytest.approx(1e-3)  # warm-up reaches the peak on its last step
    assert s.lr(10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert s.lr(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way down the cosine
    assert s.lr(35) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert s.lr(110) == pytest.approx(1e-4)
    assert all(s.wd(t) == 0.1 for t in range(110))  # weight decay throughout


def test_trilm_lr_drop_at_half_and_weight_decay_off_at_two_thirds():
    s = Schedule("trilm", total_steps=120, warmup_steps=12, peak_lr=(4e-3, 3e-3), weight_decay=0.1, min_ratio=0.1)
    assert s.lr(11) == pytest.approx(4e-3)
    assert s.lr(12) == pytest.approx(4e-3)  # linear decay starts at the first peak

    def factor(t):
        return 1 - 0.9 * (t - 12) / 108

    # 50% of the tokens: steps 0..59 use the first peak, steps 60.. the second, with the same linear decay
    assert s.lr_drop_step == 60
    assert s.lr(59) == pytest.approx(4e-3 * factor(59))
    assert s.lr(60) == pytest.approx(3e-3 * factor(60))
    # 2/3 of the tokens: weight decay is on through step 79 and off from step 80
    assert s.wd_off_step == 80
    assert s.wd(79) == 0.1 and s.wd(80) == 0.0 and s.wd(119) == 0.0
    assert s.lr(120) == pytest.approx(3e-3 * 0.1)


def test_trilm_schedule_is_linear_between_switch_points():
    s = Schedule("trilm", total_steps=30, warmup_steps=3, peak_lr=(2.0, 1.0), weight_decay=0.0, min_ratio=0.0)
    first = [s.lr(t) for t in range(3, 15)]
    diffs = {round(b - a, 12) for a, b in zip(first, first[1:], strict=False)}
    assert len(diffs) == 1 and next(iter(diffs)) < 0
