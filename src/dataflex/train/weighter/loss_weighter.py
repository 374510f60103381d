"""`loss` weighter: online sample reweighting from min-max normalised losses (Sow et al., ICLR 2025).

Over the step's losses L (every micro-batch, every process), with m = min L, M = max L:
  l~ = (2 delta l - delta (M + m)) / max(M - m, 1e-6)       in [-delta, delta]
  f  = linupper: min(l~ + delta, delta) | linear: l~ | quadratic: 1 - l~^2 / delta^2 | extremes: |l~|
  w  = softmax(f / r)
`linear` is what DataFlex calls `uniform` (kept as an alias): it is NOT uniform weighting, it up-weights
hard (high-loss) samples by up to e^(2 delta / r). DataFlex normalises per micro-batch and fixes r = 1;
here the step's whole batch is normalised together and `r` is a parameter.
"""

from __future__ import annotations

from typing import Any

import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_weighter

from .base_weighter import StepWeighter

STRATEGIES = ("linupper", "linear", "quadratic", "extremes")
ALIASES = {"uniform": "linear"}


def normalised_losses(losses: torch.Tensor, delta: float) -> torch.Tensor:
    lo, hi = losses.min(), losses.max()
    return (2 * delta * losses - delta * (hi + lo)) / torch.clamp(hi - lo, min=1e-6)


def strategy_scores(norm: torch.Tensor, strategy: str, delta: float) -> torch.Tensor:
    if strategy == "linupper":
        return torch.clamp(norm + delta, max=delta)
    if strategy == "linear":
        return norm
    if strategy == "quadratic":
        return 1 - norm**2 / delta**2
    return norm.abs()  # extremes


def loss_weights(losses: torch.Tensor, strategy: str, delta: float = 1.0, r: float = 1.0) -> torch.Tensor:
    """Softmax weights (sum 1) of the formulas in the module docstring."""
    f = strategy_scores(normalised_losses(losses.float(), delta), strategy, delta)
    return torch.softmax(f / r, dim=0)


@register_weighter("loss")
class LossWeighter(StepWeighter):
    # No **kwargs: a misspelt parameter must be an error, not silently absorbed.
    def __init__(self, strategy: str = "linupper", delta: float = 1.0, r: float = 1.0) -> None:
        super().__init__()
        self.check_params(locals())
        self.strategy, self.delta, self.r = ALIASES.get(strategy, strategy), float(delta), float(r)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        strategy = ALIASES.get(params["strategy"], params["strategy"])
        if strategy not in STRATEGIES:
            valid = ", ".join([*STRATEGIES, *ALIASES])
            raise ConfigError(f"weighter 'loss': unknown strategy '{strategy}'; valid: {valid}")
        if not params["delta"] > 0 or not params["r"] > 0:
            raise ConfigError(f"weighter 'loss': delta and r must be > 0, got delta={params['delta']}, r={params['r']}")

    def compute_weights(self, scores: torch.Tensor, ctx: Any) -> torch.Tensor:
        return loss_weights(scores, self.strategy, self.delta, self.r)
