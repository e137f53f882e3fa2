"""Speedrun tricks as config options (issue 21), each tested by what it changes: schedule
values, init statistics, shapes, parameter counts, FLOPs, memory, batch sizes per step."""

from __future__ import annotations

import types

import pytest

from minlm import TrainConfig
from minlm.config import ConfigError
from minlm.engine import Engine
from minlm.optim import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


# --- warm-up-stable-decay schedule -----------------------------------------------------------

def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, max_iters=110, min_lr_ratio=0.1,
                      schedule="wsd", decay_frac=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # warm-up as before
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == 1.0 and lr_at(50, cfg) == 1.0
    assert lr_at(90, cfg) == 1.0  # progress 0.8: the decay starts here
    assert lr_at(100, cfg) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg.replace(decay_frac=1.0)) == pytest.approx(0.19)  # = linear
    assert lr_at(100, cfg.replace(schedule="linear")) == pytest.approx(0.19)


def test_wsd_follows_a_time_budget():
    """On a time budget the engine's progress is the share of the budget used; the decay
    starts at 1 - decay_frac of the budget even when steps are far from max_iters."""
    cfg = TrainConfig(lr=1.0, warmup_iters=2, max_iters=10**6, max_minutes=1.0,
                      min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2)
    at = lambda seconds: Engine.lr(types.SimpleNamespace(  # noqa: E731
        cfg=cfg, step=100, elapsed=lambda: seconds))
    assert at(30.0) == 1.0
    assert at(48.0) == pytest.approx(1.0)
    assert at(54.0) == pytest.approx(0.5)
    assert at(60.0) == pytest.approx(0.0)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_decay_frac_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"decay_frac=.* must be in \(0, 1\]"):
        TrainConfig(schedule="wsd", decay_frac=value)
