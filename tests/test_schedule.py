"""The learning-rate schedule: warm-up, then constant, linear or cosine decay to final_ratio."""

from __future__ import annotations

import math

import pytest

from learner.schedule import lr_factor


def curve(decay, steps=11, warmup=0, final=0.1):
    return [lr_factor(s, warmup_steps=warmup, total_steps=steps, decay=decay, final_ratio=final)
            for s in range(steps)]


def test_warmup_ramps_to_one_then_constant_holds():
    assert curve("constant", steps=6, warmup=3) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_runs_from_one_after_warmup_to_the_final_ratio_at_the_last_step(decay):
    c = curve(decay, steps=13, warmup=2, final=0.1)
    assert c[:2] == [1 / 3, 2 / 3]
    assert c[2] == 1.0 and c[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(c[2:], c[3:]))  # strictly decreasing after warm-up
    # past the planned steps (a resumed run given more steps) it holds the final ratio
    assert lr_factor(40, warmup_steps=2, total_steps=13, decay=decay, final_ratio=0.1) == pytest.approx(0.1)


def test_linear_and_cosine_midpoints():
    assert curve("linear", final=0.0)[5] == pytest.approx(0.5)
    assert curve("linear", final=0.2)[5] == pytest.approx(0.6)
    assert curve("cosine", final=0.0)[5] == pytest.approx(0.5)
    assert curve("cosine", final=0.0)[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_unknown_decay_is_an_error():
    with pytest.raises(ValueError, match="unknown lr decay"):
        lr_factor(3, warmup_steps=0, total_steps=10, decay="step", final_ratio=0.1)
