"""How every batched pass over samples (gradient features, pool losses, hidden-state embeddings, rollouts)
orders its rows and switches the model to eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch


def length_sorted_batches(
    ids: Sequence[Sequence[int]], batch_size: int, rows: Iterable[int] | None = None
) -> list[list[int]]:
    """`rows` (default: all) in batches, longest first, ties by row: the first batch shows the peak memory and
    each batch is padded only to its own longest row."""
    order = sorted(range(len(ids)) if rows is None else rows, key=lambda i: (-len(ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (dropout off) for the block; the caller's mode is restored even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
