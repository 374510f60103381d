"""Evaluation during training, the best checkpoint, and early stopping (HF's `eval_strategy` and LLaMA-Factory /
DataFlex's `early_stopping_steps`): a loop `Callback`, so its state (best value, patience, stop) is in every
TrainState and a resumed or segmented run continues exactly.

At each evaluation (every `eval_steps` steps, or at the end of each epoch) the loss of every eval set is computed
with the current model (token-weighted mean, `dataflex.evaluation.eval_loss`) and recorded as `eval_<set>_loss`
plus `eval_loss`, their mean. The metric named by `metric_for_best_model` improves when it beats the best so far by
more than `early_stopping_min_delta`; then the TrainState is saved to OUTPUT_DIR/best. After
`early_stopping_steps` evaluations without improvement the run stops (a clean end: the model is saved as usual,
or the best one with `load_best_model_at_end`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dataflex.train.trainer.callbacks import Callback, TrainContext
from dataflex.utils.logging import logger

BEST_DIR = "best"


class Evaluator(Callback):
    def __init__(self, eval_sets: Mapping[str, Any], collator: Any, args: Any) -> None:
        self.eval_sets = {name: ds.select_columns(["input_ids", "labels"]) for name, ds in eval_sets.items()}
        self.collator, self.args = collator, args
        self.every = args.eval_steps or args.logging_steps
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.stopped_at: int | None = None
        self.last_epoch = 0

    def _due(self, ctx: TrainContext) -> bool:
        if self.args.eval_strategy == "steps":
            return ctx.global_step % self.every == 0
        epoch = math.floor(ctx.epoch + 1e-9)  # an epoch boundary: the integer part of the epoch advanced
        due, self.last_epoch = epoch > self.last_epoch, max(self.last_epoch, epoch)
        return due

    def on_step_end(self, ctx: TrainContext, logs: dict[str, float]) -> None:
        if self.stopped_at is not None or not self._due(ctx):
            return
        from dataflex.evaluation import eval_loss

        model = ctx.accelerator.unwrap_model(ctx.model)
        batch = self.args.per_device_eval_batch_size
        metrics = {
            f"eval_{n}_loss": eval_loss(model, ds, self.collator, batch)["loss"] for n, ds in self.eval_sets.items()
        }
        model.train()
        metrics["eval_loss"] = sum(metrics.values()) / len(metrics)
        ctx.record(metrics)
        value = metrics[self.args.metric_for_best_model]
        sign = 1.0 if self.args.greater_is_better else -1.0
        if self.best is None or sign * (value - self.best) > self.args.early_stopping_min_delta:
            self.best, self.best_step, self.bad_evaluations = value, ctx.global_step, 0
            ctx.save_state(Path(self.args.output_dir) / BEST_DIR)
        else:
            self.bad_evaluations += 1
        patience = self.args.early_stopping_steps
        if patience and self.bad_evaluations >= patience:
            self.stopped_at = ctx.global_step
            logger.info(
                "early stopping at step %d: %s has not improved on %.4f (step %d) for %d evaluations",
                ctx.global_step,
                self.args.metric_for_best_model,
                self.best,
                self.best_step,
                patience,
            )

    def should_stop(self) -> bool:
        return self.stopped_at is not None

    @property
    def best_checkpoint(self) -> Path | None:
        return Path(self.args.output_dir) / BEST_DIR if self.best_step is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
            "stopped_at": self.stopped_at,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evaluations, self.stopped_at, self.last_epoch = (
            state["bad_evaluations"],
            state["stopped_at"],
            state["last_epoch"],
        )

    def summary(self) -> dict[str, Any]:
        """What the run summary says about evaluation during training."""
        return {
            "best_metric": self.best,
            "best_step": self.best_step,
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "stopped_early_at": self.stopped_at,
        }
