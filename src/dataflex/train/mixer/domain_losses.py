"""Per-domain loss accumulation for mixers that observe training (ODM, DoReMi): token sums and counts per
domain from the loop's per-sample losses, summed over micro-batches and processes."""

from __future__ import annotations

from typing import Any

import torch


def domain_sums(values: torch.Tensor, counts: torch.Tensor, domains: torch.Tensor, k: int) -> torch.Tensor:
    """[2, k] float64: per-domain sum of `values` and of `counts` (both per sample)."""
    out = torch.zeros(2, k, dtype=torch.float64, device=values.device)
    out[0].index_add_(0, domains.to(values.device), values.detach().double())
    out[1].index_add_(0, domains.to(values.device), counts.detach().double())
    return out


def reduce_across_processes(tensor: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Sum over processes so every process computes the same update (mixer state identical everywhere)."""
    if accelerator is not None and accelerator.num_processes > 1:
        return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()
    return tensor.clone()
