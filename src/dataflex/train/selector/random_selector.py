"""`random`: uniform indices seeded by (seed, step), with or without replacement."""

from __future__ import annotations

from typing import Any

import torch

from dataflex.core.registry import register_selector

from .base_selector import Selector


@register_selector("random")
class RandomSelector(Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        cache_dir: str | None = None,
        seed: int = 42,
        replacement: bool = False,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.replacement = bool(replacement)

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(self.seed + int(step_id))
        if self.replacement:
            return torch.randint(0, n, (num_samples,), generator=gen).tolist()
        return torch.randperm(n, generator=gen)[:num_samples].tolist()
