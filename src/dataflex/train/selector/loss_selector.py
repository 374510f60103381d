"""`loss`: bucketed loss-weighted sampling, not top-k.

Terciles (`quantiles`) of the current per-sample losses split the pool into low / medium / high buckets;
every sample has weight 1, the `focus` bucket `focus_weight`; p ∝ weight^(1/temperature); `num_samples` are
drawn with `torch.multinomial` seeded by (seed, step). Samples with a non-finite loss get probability 0 (DataFlex
kept 1e-12). Without replacement and with fewer usable samples than requested, replacement is switched on with
a warning.
"""

from __future__ import annotations

from typing import Any

import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector

from .base_selector import Selector, logger
from .features_cache import PoolLossFeatures

FOCUS = ("low", "medium", "high")


def bucket_probabilities(
    losses: torch.Tensor, focus: str, focus_weight: float, quantiles: tuple[float, float], temperature: float
) -> torch.Tensor:
    valid = torch.isfinite(losses)
    if not valid.any():
        raise ValueError("every per-sample loss is NaN or infinite; nothing to select from")
    good = losses[valid].double()
    q1, q2 = (float(torch.quantile(good, q)) for q in quantiles)
    bucket = torch.full_like(losses, 1, dtype=torch.long)  # medium
    bucket[losses <= q1] = 0
    bucket[losses > q2] = 2
    weight = torch.ones_like(losses, dtype=torch.float64)
    weight[bucket == FOCUS.index(focus)] = focus_weight
    weight[~valid] = 0.0
    p = weight ** (1.0 / temperature)
    return p / p.sum()


def draw(p: torch.Tensor, k: int, replacement: bool, seed: int, name: str) -> list[int]:
    usable = int((p > 0).sum())
    if not replacement and k > usable:
        logger.warning(
            "%s: %d samples requested but only %d have a usable score; drawing with replacement", name, k, usable
        )
        replacement = True
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(p.float(), k, replacement=replacement, generator=gen).tolist()


@register_selector("loss")
class LossSelector(PoolLossFeatures, Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        cache_dir: str | None = None,
        focus: str = "high",
        focus_weight: float = 5.0,
        quantiles: tuple[float, float] = (0.33, 0.66),
        replacement: bool = False,
        temperature: float = 1.0,
        seed: int = 42,
        batch_size: int = 32,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.check_params(locals())
        self.focus, self.focus_weight, self.quantiles = focus, float(focus_weight), tuple(float(x) for x in quantiles)
        self.replacement, self.temperature, self.batch_size = bool(replacement), float(temperature), int(batch_size)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if params["focus"] not in FOCUS:
            raise ConfigError(f"selector 'loss': focus must be one of {', '.join(FOCUS)}, got {params['focus']!r}")
        q = params["quantiles"]
        if len(q) != 2 or not 0 < q[0] < q[1] < 1:
            raise ConfigError(f"selector 'loss': quantiles must be two increasing fractions in (0, 1), got {q}")
        if not params["focus_weight"] > 0 or not params["temperature"] > 0:
            raise ConfigError("selector 'loss': focus_weight and temperature must be > 0")

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        losses = torch.tensor(feats["losses"], dtype=torch.float64)
        p = bucket_probabilities(losses, self.focus, self.focus_weight, self.quantiles, self.temperature)
        picked = draw(p, num_samples, self.replacement, self.seed + int(step_id), "selector 'loss'")
        self.last_metric = {"loss": [float(losses[i]) for i in picked]}
        return picked
