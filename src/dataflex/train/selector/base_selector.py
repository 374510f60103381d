"""Selector base class with the seed page's interface.

`Selector(dataset, accelerator, data_collator, cache_dir)`; `select(model, step_id, num_samples, **kwargs)`
returns pool indices; `warmup(num_samples, replacement)` picks the warmup data (random by default, drawn
fresh for every flex epoch and seeded by the run seed and the flex epoch only: the select mode sets `run_seed`
and `flex_epoch` before calling it, and `flex_epoch` before every `select`). The selector's own `seed` parameter
keeps its other uses (its selection draws, LESS's projector, clustering, rollouts), so changing it never changes
the warm-up data, and two runs with different run seeds warm up on different data (DataFlex seeded the warm-up by
the selector's `seed`, the same draw in every flex epoch and run).

Optional: `compute_features(model, step_id, **kwargs) -> dict` computes what `select` needs (per-sample losses,
gradient features) as its own pipeline node; its result reaches `select` as the `features` keyword. A selector
without it computes everything inside `select`, as on the seed page. A selector is a `Callback`: its
`state_dict()` is carried in every TrainState.

As in DataFlex, `data_collator` keeps the integer fields a selector adds to the rows (DataFlex's selectors collate
`{"idx": i, **dataset[i]}` and read `batch["idx"]`), and `dataflex.utils.selector_io` caches a selection as
`step_<g>.json` under `cache_dir` (which defaults to OUTPUT_DIR/selector_cache).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from dataflex.compat import KeepAddedFields
from dataflex.train.trainer.callbacks import Callback
from dataflex.utils.logging import logger

__all__ = ["DEFAULT_RUN_SEED", "Selector", "logger", "warmup_seed"]


# The run seed a selector assumes outside a run (TrainingArguments' default); the select mode sets the real one.
DEFAULT_RUN_SEED = 42


def warmup_seed(run_seed: int, flex_epoch: int) -> int:
    """The warm-up generator's seed: a function of (run seed, flex epoch) only."""
    return int(run_seed) * 100_003 + int(flex_epoch)


class Selector(Callback, ABC):
    # Class-level defaults so a DataFlex-written selector that skips `super().__init__` still has them.
    run_seed: int = DEFAULT_RUN_SEED
    flex_epoch: int = 0

    def __init__(
        self, dataset: Any, accelerator: Any, data_collator: Any, cache_dir: str | None = None, seed: int = 42
    ) -> None:
        self.dataset = dataset
        self.accelerator = accelerator
        self.data_collator = KeepAddedFields(data_collator) if data_collator is not None else None
        self.cache_dir = cache_dir
        self.seed = seed
        self.run_seed = DEFAULT_RUN_SEED
        self.flex_epoch = 0

    def warmup(self, num_samples: int, replacement: bool = False) -> list[int]:
        """Random warmup indices seeded by (run seed, flex epoch), not by the selector's `seed`: fresh per flex epoch
        and per run, no global RNG touched."""
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(warmup_seed(self.run_seed, self.flex_epoch))
        if replacement:
            return torch.randint(0, n, (num_samples,), generator=gen).tolist()
        if num_samples > n:
            from dataflex.core.errors import ConfigError

            raise ConfigError(
                f"warmup needs {num_samples} samples but the pool has {n}; lower warmup_step or "
                "the batch size, or allow replacement"
            )
        return torch.randperm(n, generator=gen)[:num_samples].tolist()

    @abstractmethod
    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        """Indices into `dataset` of the samples to train on next."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state carried in TrainState (override when the selector keeps history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
