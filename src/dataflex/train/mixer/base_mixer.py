"""Mixer base class with the seed page's interface: `Mixer(mixture_manager)`; `mix(model, step_id, **kwargs)`.

A mixer is a `Callback`: mixers that learn from training (ODM's rewards, DoReMi's excess losses) override
`on_micro_batch` / `on_step_end`; a mixer that changes what is back-propagated returns its `LossStrategy` from
`loss_strategy()` (DoReMi's proxy loss)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

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
