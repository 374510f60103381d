"""`dynamic_weight`: the same data as static, with a weighter replacing the loss from `warmup_step` on.

`train_step` > 0 sets the total number of optimizer steps (DataFlex's meaning)."""

from __future__ import annotations

from dataclasses import replace

import datasets

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.train.modes import component_for
from dataflex.train.run import Mode, Run
from dataflex.train.trainer import Callback, LossStrategy, TrainingArguments, WeightedLoss

__all__ = ["WeightMode"]


class WeightMode(Mode):
    name = "dynamic_weight"

    def args(self) -> TrainingArguments:
        steps = self.cfg.dataflex.train_step
        return replace(self.cfg.train, max_steps=steps) if steps > 0 else self.cfg.train

    def components(self, run: Run) -> dict[str, Callback]:
        self.component, params = component_for(self.cfg.dataflex, "weighter")
        sets = run.eval_sets
        anchors = datasets.concatenate_datasets(list(sets.values())) if sets else None
        weighter = REGISTRY.build("weighter", self.component, runtime=run.runtime(eval_dataset=anchors), cfg=params)
        return {"weighter": weighter}

    def loss(self, run: Run) -> LossStrategy:
        return WeightedLoss(run.callbacks["weighter"], self.cfg.dataflex.warmup_step, self.component)

    def ready(self, run: Run) -> None:
        warmup, steps = self.cfg.dataflex.warmup_step, run.trainer.plan.num_steps
        if warmup > steps:
            raise ConfigError(
                f"warmup_step ({warmup}) is larger than the run's {steps} optimizer steps: "
                "the weighter would never start; lower warmup_step or train longer"
            )
