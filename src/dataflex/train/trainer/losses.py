"""Per-sample losses, computed once per micro-batch (fp32), and the default loss normalisation.

The default loss equals the HF Trainer's for causal LMs: summed token cross-entropy divided by the
number of supervised tokens in the whole accumulation window (all micro-batches, all processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dataflex.features.token_losses import IGNORE_INDEX, count_supervised_tokens, per_token_losses

__all__ = ["IGNORE_INDEX", "MicroBatchLosses", "count_supervised_tokens", "forward_losses", "per_token_losses"]


@dataclass
class MicroBatchLosses:
    """What one micro-batch's forward pass yields, shared by the loss, weighters and observers."""

    token_loss_sum: torch.Tensor  # [B] fp32, summed CE over each row's supervised tokens (with graph)
    token_count: torch.Tensor  # [B] int64, supervised tokens per row
    window_tokens: int  # supervised tokens in the whole accumulation window, all processes
    num_processes: int = 1
    sample_id: torch.Tensor | None = None
    domain_id: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None  # [B, L-1] fp32 per-token CE (0 where ignored), with graph
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_sample_loss(self) -> torch.Tensor:
        """Token-mean loss of each row (0 for a fully masked row), with graph."""
        return self.token_loss_sum / self.token_count.clamp(min=1).to(self.token_loss_sum.dtype)

    def standard_loss(self) -> torch.Tensor:
        """The HF Trainer's loss contribution of this micro-batch.

        Multiplied by the number of processes because DDP averages gradients across ranks while the
        window token count is global (HF does the same with average_tokens_across_devices).
        """
        return self.token_loss_sum.sum() * self.num_processes / max(self.window_tokens, 1)


def forward_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, window_tokens: int, num_processes: int = 1
) -> MicroBatchLosses:
    """Run the model once (no labels: the model computes no loss of its own) and derive per-sample losses."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    labels = batch["labels"]
    tok = per_token_losses(outputs.logits, labels)
    return MicroBatchLosses(
        token_loss_sum=tok.sum(dim=1),
        token_count=count_supervised_tokens(labels),
        window_tokens=window_tokens,
        num_processes=num_processes,
        sample_id=batch.get("sample_id"),
        domain_id=batch.get("domain_id"),
        token_losses=tok,
        labels=labels,
    )
