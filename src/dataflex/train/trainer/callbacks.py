"""The one seam between the loop and the components: selectors, mixers and weighters all extend `Callback`.

The loop calls every callback at each micro-batch (with its per-sample losses) and at each optimizer step's end,
merges their `metrics()` into the log line, and saves their `state_dict()` in every TrainState under their name,
so resuming restores them exactly. Every hook is a no-op by default: a component overrides what it uses, and the
loop never probes for attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dataflex.train.trainer.args import TrainingArguments
    from dataflex.train.trainer.losses import MicroBatchLosses

__all__ = ["Callback", "TrainContext"]


@dataclass
class TrainContext:
    """What components see of the loop (the seed page's `ctx`)."""

    global_step: int
    max_steps: int
    epoch: float
    micro_step: int
    num_micro_batches: int
    accelerator: Accelerator
    args: TrainingArguments
    domain_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the (wrapped) model being trained
    # The loop's services: `record(metrics)` adds metrics to this step's history and the MLflow sink;
    # `save_state(path)` writes a TrainState there (every process calls it; the main one writes).
    record: Callable[[dict[str, float]], None] | None = None
    save_state: Callable[[Path], Any] | None = None


class Callback:
    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Value checks of the user's parameters (choices, ranges, combinations): `params` is the constructor's
        defaults updated with the components file. The registry calls it when the config is validated, before any
        data is tokenised; a component's `__init__` calls it too (`self.check_params(locals())`), so one home."""

    def on_micro_batch(self, losses: MicroBatchLosses, ctx: TrainContext) -> None:
        """After each micro-batch's forward pass (losses carry the graph; detach what you keep)."""

    def on_step_end(self, ctx: TrainContext, logs: dict[str, float]) -> None:
        """After each optimizer step; `logs` is the step's log line, empty between logging steps."""

    def should_stop(self) -> bool:
        """True ends the run after this step (early stopping), as cleanly as reaching its last step."""
        return False

    def metrics(self) -> dict[str, float]:
        """Metrics for the next log line (called at logging steps only)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state carried in TrainState."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
