"""Mixer base class with the seed page's interface: `Mixer(mixture_manager)`; `mix(model, step_id, **kwargs)`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

__all__ = ["Mixer"]


class Mixer(ABC):
    def __init__(self, mixture_manager: Any) -> None:
        self.mixture_manager = mixture_manager

    @abstractmethod
    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        """Domain proportions: length = number of domains (`mixture_manager.names`), non-negative, sum 1."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
