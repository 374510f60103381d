"""Token-level cross-entropy of a causal LM, the one definition every loss in the project derives from."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataflex.data.processing import IGNORE_INDEX


def count_supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Supervised tokens per row after the causal shift (the first label never has a prediction)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L-1] fp32 cross-entropy of shifted logits; 0 where the label is ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    vocab = shift_logits.size(-1)
    tok = F.cross_entropy(
        shift_logits.reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return tok.view(shift_labels.shape)
