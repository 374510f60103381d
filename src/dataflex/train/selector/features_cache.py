"""Per-sample losses of the pool for loss-based selectors, batched and cached by content.

The key is (trainable weights + base model id, the samples' token ids and labels): the same model state on the
same pool is a hit whatever the step number; any change is a miss (DataFlex keyed by step alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from dataflex.distributed.collectives import (
    cached_for_all,
    current_accelerator,
    gather_varlen,
    main_process_writes,
    rank_block,
)
from dataflex.features import model_state_fingerprint, sample_hashes
from dataflex.features.batching import eval_mode, length_sorted_batches
from dataflex.features.gradients import _as_rows, _pad, per_sample_losses
from dataflex.features.token_losses import IGNORE_INDEX
from dataflex.utils.io import atomic_write_bytes, sha256_json
from dataflex.utils.logging import logger

LOSS_CODE_VERSION = "1"


@torch.no_grad()
def pool_losses(model: torch.nn.Module, dataset: Any, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """[N] each sample's token-mean CE under `model` (eval mode, length-sorted right-padded batches, fp32)."""
    ids, labels = _as_rows(dataset)
    device = next(model.parameters()).device
    acc = current_accelerator()  # launched workers: each computes a contiguous share, merged in row order
    mine = rank_block(len(ids), acc)
    out = torch.empty(len(ids))
    with eval_mode(model):
        for rows in tqdm(
            length_sorted_batches(ids, batch_size, mine), desc="per-sample losses", unit="batch", disable=not progress
        ):
            x = _pad([ids[i] for i in rows], 0, device)
            y = _pad([labels[i] for i in rows], IGNORE_INDEX, device)
            out[torch.tensor(rows)] = per_sample_losses(model, x, y).float().cpu()
    return gather_varlen(acc, out[mine.start : mine.stop])


def cached_pool_losses(
    model: torch.nn.Module,
    dataset: Any,
    cache_dir: str | Path,
    *,
    base_model_id: str | None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[torch.Tensor, bool]:
    """(losses, cache hit) with the losses stored under `cache_dir/losses/<key>.safetensors`."""
    key = sha256_json(
        {
            "model": model_state_fingerprint(model, base_model_id),
            "samples": sample_hashes(dataset),
            "version": LOSS_CODE_VERSION,
        }
    )
    path = Path(cache_dir) / "losses" / f"{key[:32]}.safetensors"
    if cached_for_all(path):
        logger.info("per-sample losses: cache hit %s", path)
        return load_file(str(path))["losses"], True
    losses = pool_losses(model, dataset, batch_size, progress)
    with main_process_writes() as writer:
        if writer:
            atomic_write_bytes(path, save({"losses": losses.contiguous()}, metadata={"key": key}))
    return losses, False


class PoolLossFeatures:
    """`compute_features` for selectors driven by the pool's per-sample losses (`loss`, `delta_loss`)."""

    dataset: Any
    cache_dir: str | None
    batch_size: int

    def compute_features(
        self, model: torch.nn.Module, step_id: int, *, base_model_id: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        losses, hit = cached_pool_losses(
            model,
            self.dataset,
            self.cache_dir or "data/02_intermediate/selector_cache",
            base_model_id=base_model_id,
            batch_size=self.batch_size,
        )
        return {"losses": losses.tolist(), "cache_hit": hit}
