"""Right-padding collator for causal LM batches that keeps `sample_id` / `domain_id`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dataflex.core.errors import ConfigError

IGNORE_INDEX = -100
PASS_THROUGH = ("sample_id", "domain_id")


class DataCollatorForCausalLM:
    """Pads `input_ids` (pad id) and `labels` (-100) on the right, builds `attention_mask`.

    `sample_id` / `domain_id` pass through as int64 tensors of shape (B,) so selectors, mixers and
    weighters can attribute per-sample losses; every other column is dropped (the model never sees it).
    Right padding matters: per-sample gradient hooks and loss masks assume real tokens come first.
    """

    def __init__(self, tokenizer_or_pad_id: Any, pad_to_multiple_of: int | None = None) -> None:
        if isinstance(tokenizer_or_pad_id, int) and not isinstance(tokenizer_or_pad_id, bool):
            pad_id: int | None = tokenizer_or_pad_id
        else:
            tok = tokenizer_or_pad_id
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # LF falls back to eos
        if pad_id is None:
            raise ConfigError("the tokenizer has neither pad_token nor eos_token; set pad_token before training")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1 or null, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        seqs = [_as_list(f["input_ids"]) for f in features]
        has_labels = all("labels" in f for f in features)
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch_size = len(seqs)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for i, (f, ids) in enumerate(zip(features, seqs)):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :n] = 1
            if labels is not None:
                lab = _as_list(f["labels"])
                if len(lab) != n:
                    raise ValueError(f"feature {i}: labels length {len(lab)} != input_ids length {n}")
                labels[i, :n] = torch.tensor(lab, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            batch["labels"] = labels
        for key in PASS_THROUGH:
            if all(key in f for f in features):
                batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)
