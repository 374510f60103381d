"""Weighter base class with the seed page's interface.

Subclasses implement `get_weighted_loss(losses, *, ctx, model, inputs) -> scalar`. The base class owns
`training_step`, which runs the one loop's forward pass (per-sample losses computed once, fp32), applies
the weighting when `use_weighter` is true, and back-propagates. The loop itself uses `loss_for_batch`,
the same logic without the forward/backward, so there is one implementation of each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from dataflex.train.trainer.losses import IGNORE_INDEX, MicroBatchLosses, forward_losses, per_token_losses

__all__ = ["Weighter"]


class Weighter(ABC):
    def __init__(self, **kwargs: Any) -> None:
        # DataFlex passes runtime objects by keyword; keep what arrives so subclasses can use it.
        self.runtime = dict(kwargs)

    @abstractmethod
    def get_weighted_loss(
        self,
        losses: torch.Tensor,
        *,
        ctx: Any = None,
        model: nn.Module | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Weighted scalar loss from this micro-batch's per-sample losses (B,)."""

    @staticmethod
    def _per_sample_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean cross-entropy per row in fp32; 0 for a row with no supervised token."""
        tok = per_token_losses(logits, labels)
        count = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return tok.sum(dim=1) / count

    def loss_for_batch(
        self, losses: MicroBatchLosses, ctx: Any, model: nn.Module, inputs: dict[str, Any], use_weighter: bool = True
    ) -> torch.Tensor:
        if not use_weighter:
            return losses.standard_loss()
        return self.get_weighted_loss(losses.per_sample_loss, ctx=ctx, model=model, inputs=inputs)

    def training_step(
        self, ctx: Any, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: int, use_weighter: bool = True
    ) -> torch.Tensor:
        """Forward, (weighted) loss, backward for one micro-batch; returns the detached loss."""
        model.train()
        accelerator = getattr(ctx, "accelerator", None)
        num_processes = accelerator.num_processes if accelerator is not None else 1
        losses = forward_losses(model, inputs, window_tokens=int(num_items_in_batch), num_processes=num_processes)
        loss = self.loss_for_batch(losses, ctx, model, inputs, use_weighter)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
