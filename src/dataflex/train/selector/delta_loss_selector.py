"""`delta_loss`: a loss-reduction curriculum with a sliding window, with its failures defined.

First selection of the run: the pool's losses L⁰ are recorded (selector state, so they survive resume) and the
selection is uniform without replacement. Later: Δ = L⁰ − L (positive = the loss went down), samples ordered by
Δ descending; a window of ω·N positions slides from the most improved (early in the flex epoch) towards the least
improved (late): start = σ(t)·(1−ω)·N with σ(t) = 1/(1+exp(−10(t−0.5))), t = (c−1)/(U−1) for the c-th of U
selections. Samples whose loss went up are never inside the window. Window members weigh 40× the rest.

Defined where DataFlex fails: U = 1 (DataFlex divides by zero) uses t = 0; a window left empty by the clipping
(every sample at or past the window start got worse) is moved back to end at the last improved sample; when no
sample improved at all the draw is uniform. Draws are without replacement unless num_samples > N.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector

from .base_selector import Selector, logger
from .features_cache import PoolLossFeatures
from .loss_selector import draw

INSIDE, OUTSIDE = 1.0, 0.025


def window_positions(
    delta: torch.Tensor, current: int, total: int, window_size: float
) -> tuple[torch.Tensor, int, int]:
    """(order by Δ descending, window start, window end) as described in the module docstring."""
    n = delta.numel()
    order = torch.sort(-delta, stable=True).indices
    t = (current - 1) / (total - 1) if total > 1 else 0.0
    t = min(max(t, 0.0), 1.0)
    sigma = 1.0 / (1.0 + math.exp(-10.0 * (t - 0.5)))
    a = sigma * (1.0 - window_size) * n
    start, end = int(a), int(a + window_size * n)
    improved = int((delta[order] >= 0).sum())  # Δ sorted descending: the first `improved` did not get worse
    end = min(end, improved)
    if end <= start:
        end = improved
        start = max(0, end - max(1, int(window_size * n)))
    return order, start, end


@register_selector("delta_loss")
class DeltaLossSelector(PoolLossFeatures, Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        cache_dir: str | None = None,
        window_size: float = 0.2,
        seed: int = 42,
        batch_size: int = 32,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.check_params(locals())
        self.window_size, self.batch_size = float(window_size), int(batch_size)
        self.initial_losses: list[float] | None = None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if not 0 < params["window_size"] <= 1:
            raise ConfigError(f"selector 'delta_loss': window_size must be in (0, 1], got {params['window_size']}")

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        losses = torch.tensor(feats["losses"], dtype=torch.float64)
        n = losses.numel()
        gen = torch.Generator().manual_seed(self.seed + int(step_id))
        if self.initial_losses is None:
            self.initial_losses = losses.tolist()
            self.last_metric = {"phase": "initial"}
            if num_samples > n:
                return torch.randint(0, n, (num_samples,), generator=gen).tolist()
            return torch.randperm(n, generator=gen)[:num_samples].tolist()
        delta = torch.tensor(self.initial_losses, dtype=torch.float64) - losses
        delta = torch.nan_to_num(delta, nan=-math.inf)
        current, total = int(kwargs.get("current_update_times", 1)), int(kwargs.get("update_times", 1))
        order, start, end = window_positions(delta, current, total, self.window_size)
        weight = torch.full((n,), OUTSIDE, dtype=torch.float64)
        if end > start:
            weight[order[start:end]] = INSIDE
        else:
            logger.info("selector 'delta_loss' at step %d: no sample improved; drawing uniformly", step_id)
        picked = draw(
            weight / weight.sum(), num_samples, num_samples > n, self.seed + int(step_id), "selector 'delta_loss'"
        )
        self.last_metric = {"window": [start, end], "delta_loss": [float(delta[i]) for i in picked]}
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"initial_losses": self.initial_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_losses = state.get("initial_losses")
