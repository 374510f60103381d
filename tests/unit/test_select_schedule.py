"""Dynamic selection without a model: the schedule against DataFlex's worked examples (less.yaml on one GPU,
its test config), the loss and delta-loss selectors' math on hand-made losses, and bad config refused before
training.
(The runs on the tiny model are in tests/integration/test_select.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from dataflex.config import DEFAULTS, RunConfig
from dataflex.core.errors import ConfigError
from dataflex.train.modes import select
from dataflex.train.schedule import select_schedule
from dataflex.train.selector.delta_loss_selector import window_positions
from dataflex.train.selector.loss_selector import bucket_probabilities


def sched(b=1, a=1, w=10, u=10, t=2, s=0, e=1.0, n=999):
    cfg = RunConfig.from_params(
        {
            "dataflex": {"warmup_step": w, "update_step": u, "update_times": t, "train_step": s},
            "train": {"per_device_train_batch_size": b, "gradient_accumulation_steps": a, "num_train_epochs": e},
        }
    )
    return select_schedule(cfg.dataflex, cfg.train, n)


def steps(schedule, kind):
    return [ev.step for ev in schedule.events if ev.kind == kind]


def test_schedule_worked_examples():
    # less.yaml on one GPU: G = 1, E = 30, selections at 10 and 20 of 10 samples each, warmup 10 samples.
    s = sched()
    assert (s.global_batch, s.epoch_steps, s.max_steps) == (1, 30, 30)
    assert steps(s, "select") == [10, 20] and steps(s, "warmup") == [0]
    assert [s.global_batch * (ev.end - ev.step) for ev in s.events] == [10, 10, 10]
    assert [(ev.current, ev.update_times) for ev in s.selections] == [(1, 2), (2, 2)]
    # The same with num_train_epochs 3: 90 steps, re-warmups at 30 and 60.
    s = sched(e=3.0)
    assert s.max_steps == 90 and steps(s, "select") == [10, 20, 40, 50, 70, 80] and steps(s, "warmup") == [0, 30, 60]
    assert [ev.flex_epoch for ev in s.selections] == [0, 0, 1, 1, 2, 2]
    # test_select.yaml: B = 2, A = 16 -> G = 32; warmup 128 samples, selections of 96, E = 16.
    s = sched(b=2, a=16, w=4, u=3, t=4)
    assert s.global_batch == 32 and s.epoch_steps == 16 and steps(s, "select") == [4, 7, 10, 13]
    assert s.global_batch * (s.events[0].end - s.events[0].step) == 128
    assert all(s.global_batch * (ev.end - ev.step) == 96 for ev in s.selections)
    assert s.num_rounds == 5 and s.round_range(0) == (0, 4) and s.round_range(4) == (13, 16)


def test_schedule_train_step_and_update_times_at_most_zero():
    # train_step cuts the run: the last selection gets only the steps left (and as many samples), fully consumed.
    s = sched(s=25)
    assert s.max_steps == 25 and steps(s, "select") == [10, 20] and s.selections[-1].end == 25
    # update_times <= 0 without train_step: the flex epoch is the pool, ceil(N / G) steps.
    s = sched(b=8, w=3, u=4, t=0, n=100)
    assert s.epoch_steps == 13 and s.max_steps == 13 and steps(s, "select") == [3, 7, 11]
    assert [ev.update_times for ev in s.selections] == [3, 3, 3]  # ceil((13 - 3) / 4)
    assert s.selections[-1].end - s.selections[-1].step == 2  # truncated to the epoch, and so is its size
    # update_times <= 0 with train_step: no flex epochs, selections every u steps after w.
    s = sched(w=2, u=3, t=0, s=10)
    assert s.epoch_steps is None and steps(s, "select") == [2, 5, 8] and steps(s, "warmup") == [0]
    with pytest.raises(ConfigError, match="warmup_step >= 1 and update_step >= 1"):
        sched(w=0)
    with pytest.raises(ConfigError, match="warmup_step >= 1 and update_step >= 1"):
        sched(u=0)


def test_loss_selector_buckets_on_hand_made_losses():
    losses = torch.tensor([0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 5.0, 6.0, 7.0, float("nan")], dtype=torch.float64)
    p = bucket_probabilities(losses, "high", 5.0, (0.33, 0.66), 1.0)
    assert p[-1] == 0  # a NaN loss is never drawn
    assert torch.allclose(p[:9], torch.tensor([1, 1, 1, 1, 1, 1, 5, 5, 5], dtype=torch.float64) / 21)
    low = bucket_probabilities(losses, "low", 5.0, (0.33, 0.66), 2.0)  # temperature 2: focus ratio sqrt(5)
    assert float(low[0] / low[4]) == pytest.approx(math.sqrt(5))


def test_delta_loss_window_slides_and_never_includes_worse_samples():
    delta = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, -1.0, -2.0], dtype=torch.float64)
    order, start, end = window_positions(delta, 1, 3, 0.2)
    assert order.tolist() == list(range(10)) and (start, end) == (0, 2)  # t = 0: the most improved
    _, start, end = window_positions(delta, 2, 3, 0.2)
    assert (start, end) == (4, 6)  # t = 0.5: sigma = 0.5 -> a = 0.5 * 0.8 * 10
    _, start, end = window_positions(delta, 3, 3, 0.2)
    assert end <= 8 and start < end  # t = 1: clipped at the first sample that got worse, never empty
    _, start, end = window_positions(delta, 1, 1, 0.2)  # U = 1: t = 0, no division by zero
    assert (start, end) == (0, 2)
    _, start, end = window_positions(-torch.ones(4, dtype=torch.float64), 1, 2, 0.5)
    assert start == end == 0  # nothing improved: no window (the selector then draws uniformly)


def test_bad_select_config_is_refused_before_training(sft_pool):
    train = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}
    base = {**DEFAULTS["dataflex"], "train_type": "dynamic_select", "warmup_step": 1, "update_step": 1}

    def check(flex, has_eval, pool_size=None):
        cfg = RunConfig.from_params({"train": train, "dataflex": flex})
        select.check_select_config(cfg, has_eval, pool_size)

    with pytest.raises(ConfigError, match="unknown selector 'nope'; registered selectors: ") as err:
        check({**base, "component_name": "nope"}, True)
    listed = str(err.value).split("registered selectors: ")[1].split(" (")[0].split(", ")
    assert {"custom", "delta_loss", "less", "loss", "random"} <= set(listed) and listed == sorted(listed)
    with pytest.raises(ConfigError, match="does not accept parameter"):
        check(
            {
                **base,
                "component_name": "random",
                "components": {"selectors": {"random": {"name": "random", "params": {"sed": 1}}}},
            },
            True,
        )
    with pytest.raises(ConfigError, match="'less' needs an eval_dataset"):
        check({**base, "component_name": "less"}, False)
    with pytest.raises(ConfigError, match="G x update_step = 160 samples but the pool has 120"):
        check({**base, "component_name": "random", "update_step": 10}, True, 120)
    rep = {"selectors": {"random": {"name": "random", "params": {"replacement": True}}}}
    check({**base, "component_name": "random", "update_step": 10, "components": rep}, True, 120)
