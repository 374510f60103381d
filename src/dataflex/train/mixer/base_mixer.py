"""Mixer base class with the seed page's interface: `Mixer(mixture_manager)`; `mix(model, step_id, **kwargs)`.

A mixer is a `Callback`: mixers that learn from training (ODM's rewards, DoReMi's excess losses) override
`on_micro_batch` / `on_step_end`; a mixer that changes what is back-propagated returns its `LossStrategy` from
`loss_strategy()` (DoReMi's proxy loss).

`mix` is called with the keywords DataFlex's MixTrainer passed, each when the signature accepts it: `batch` (the
last training micro-batch, on the device), `domain_ids` (its `domain_id`), `data_collator`, and `dataset` (the rows
drawn since the previous mix, a `MixedSnapshot`). DataFlex's optional hooks (`update_batch_info`,
`get_current_doremi_weights`, `save_average_weights`) are called when a mixer defines them (`dataflex.compat`).
A mixer without its own `state_dict` has the numbers and arrays in its attributes carried in TrainState and between
mixing rounds, so one written for DataFlex (which keeps its state in attributes) continues across rounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from dataflex.compat import attribute_state, load_attribute_state
from dataflex.train.trainer.callbacks import Callback
from dataflex.train.trainer.losses import LossStrategy

__all__ = ["Mixer"]


class Mixer(Callback, ABC):
    def __init__(self, mixture_manager: Any) -> None:
        self.mixture_manager = mixture_manager

    @abstractmethod
    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        """Domain proportions: length = number of domains (`mixture_manager.names`), non-negative, sum 1."""

    def loss_strategy(self) -> LossStrategy | None:
        """The loss this mixer trains with; None: the standard token mean."""
        return None

    def stats(self) -> dict[str, Any]:
        """Extra numbers recorded with each mixture (mixture/proportions.jsonl)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return attribute_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_attribute_state(self, state)
