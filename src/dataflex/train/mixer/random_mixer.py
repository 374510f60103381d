"""`random` mixer: fresh random proportions at every call.

DataFlex's version re-seeds numpy's global RNG with the same seed on every call, so it returns the same
vector every time (and clobbers the global RNG). Here each call draws from a generator seeded by
(seed, step): different per call, reproducible, and no global state is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dataflex.core.registry import register_mixer
from dataflex.utils.logging import logger

from .base_mixer import Mixer


@register_mixer("random")
class RandomMixer(Mixer):
    def __init__(self, mixture_manager: Any, seed: int = 42) -> None:
        super().__init__(mixture_manager)
        self.seed = seed

    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        raw = np.random.default_rng([self.seed, step_id]).random(len(self.mixture_manager.names))
        probs = raw / raw.sum()
        logger.info("[RandomMixer] step %d proportions %s", step_id, np.round(probs, 4).tolist())
        return probs
