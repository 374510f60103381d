"""The seed page's example weighter, verbatim: uniform 1/B weights per micro-batch (a per-sample mean of
token-mean losses, which is not the standard token-mean loss; see README)."""

from typing import Any, Union

import torch
from torch import nn

from dataflex.core.registry import register_weighter
from dataflex.utils.logging import logger

from .base_weighter import Weighter


@register_weighter("custom")
class CustomWeighter(Weighter):
    def __init__(self, strategy: str = "uniform", **kwargs):
        super().__init__(**kwargs)
        self.strategy = strategy
        logger.info(f"CustomWeighter initialized with strategy: {strategy}")

    def get_weighted_loss(
        self,
        losses: torch.Tensor,
        *,
        ctx: Any = None,
        model: nn.Module | None = None,
        inputs: dict[str, Union[torch.Tensor, Any]] | None = None,  # noqa: UP007 (seed page verbatim)
    ) -> torch.Tensor:
        if not torch.is_tensor(losses) or losses.dim() == 0:
            return losses
        weights = torch.ones_like(losses) / losses.numel()
        weighted_loss = torch.sum(weights * losses)
        return weighted_loss
