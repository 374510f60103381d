"""`static` mixer: the same configured proportions at every call (uniform when none are given)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dataflex.core.registry import register_mixer
from dataflex.train.dataset.mixed_proportion_manager import check_proportions

from .base_mixer import Mixer


@register_mixer("static")
class StaticMixer(Mixer):
    def __init__(self, mixture_manager: Any, proportions: Sequence[float] | None = None) -> None:
        super().__init__(mixture_manager)
        k = len(mixture_manager.names)
        self.proportions = check_proportions(
            proportions if proportions is not None else [1.0] * k, k, "static mixer proportions"
        )

    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        return self.proportions.copy()
