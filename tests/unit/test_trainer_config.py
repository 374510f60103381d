"""The training loop's plan arithmetic and argument checks (no model).
(HF-Trainer equality, accumulation and resume are in tests/integration/test_trainer.py.)"""

from __future__ import annotations

import pytest

from dataflex.core.errors import ConfigError
from dataflex.train.trainer import EpochPlan, TrainingArguments


def test_epoch_plan_arithmetic():
    plan = EpochPlan(10, 3, 2, seed=0, num_epochs=2)
    assert plan.micro_per_epoch == 4 and plan.steps_per_epoch == 2 and plan.num_steps == 4
    e0 = plan.step_batches(0) + plan.step_batches(1)
    assert sorted(i for b in e0 for i in b) == list(range(10))  # one epoch covers the pool once
    assert [len(b) for b in e0] == [3, 3, 3, 1]
    assert plan.step_batches(2) != plan.step_batches(0)  # reshuffled per epoch
    assert EpochPlan(10, 3, 2, seed=0, num_epochs=0.5).num_steps == 1
    assert EpochPlan(10, 3, 2, seed=0, max_steps=7).num_steps == 7
    assert EpochPlan(10, 3, 1, seed=0, shuffle=False).step_batches(1) == [[3, 4, 5]]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive integer"),
        ({"gradient_accumulation_steps": -1}, "gradient_accumulation_steps must be a positive integer"),
        ({"learning_rate": 0}, "learning_rate must be > 0"),
        ({"learning_rate": -1e-4}, "learning_rate must be > 0"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"num_train_epochs": 0}, "num_train_epochs must be > 0"),
        ({"lr_scheduler_type": "warmup_stable"}, "lr_scheduler_type 'warmup_stable' is not supported"),
        ({"mixed_precision": "fp8"}, "mixed_precision 'fp8' is not valid"),
    ],
)
def test_bad_training_arguments(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainingArguments(**bad)
