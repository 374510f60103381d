"""`near`: the target examples' nearest pool samples in a sentence-embedding space.

`compute_features` embeds the pool and the target (content-cached) and searches the `max_K` nearest pool rows of
every target example (faiss, exact below `exact_threshold`; cached); `select` walks the neighbour matrix column by
column (1st neighbour of every query, then the 2nd ...) skipping duplicates. If `max_K` neighbours are not enough
for the budget, the remaining rows follow by their distance to the closest query (DataFlex raised). Indices are
rows of the processed pool, the space the embeddings were computed in (no drift, no -1).

`indices_path` (DataFlex's parameter): a precomputed `top_indices.npy` ([queries, K] pool rows, nearest first, as
written by DataFlex's offline tool or `dataflex-cli offline-select near`) is walked instead, with no embedding and
no target needed; it is checked against the pool when the selector is built. Past its distinct rows the ranking is
repeated (there are no distances to continue with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.core.registry import register_selector
from dataflex.distributed.collectives import broadcast_object
from dataflex.features.distribution import near_order
from dataflex.features.embeddings import EmbeddingSettings, EmbeddingStore
from dataflex.features.neighbors import EXACT_THRESHOLD
from dataflex.utils.io import sha256_file
from dataflex.utils.logging import logger

from .base_selector import Selector
from .embedding_common import (
    EmbeddingMixin,
    cached_neighbors,
    check_file,
    fill_to,
    load_neighbors,
    load_top_indices,
    needs_target,
    positive_int,
)


@register_selector("near")
class NearSelector(EmbeddingMixin, Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        eval_dataset: Any = None,
        cache_dir: str | None = None,
        seed: int = 42,
        encoder: str = "all-MiniLM-L6-v2",
        layer: int = -1,
        text: str = "full",
        max_length: int = 256,
        batch_size: int = 32,
        max_K: int = 1000,
        exact_threshold: int = EXACT_THRESHOLD,
        tokenizer_path: str | None = None,
        indices_path: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.check_params(locals())
        self.indices_path = indices_path
        self.top_indices: np.ndarray | None = None
        if indices_path is not None:
            self.top_indices = load_top_indices(indices_path, len(dataset))
            self.file_sha256 = sha256_file(Path(indices_path).expanduser())
            self.eval_dataset = eval_dataset  # the queries are baked into the file
            logger.info(
                "near: neighbours from %s (%d queries x %d); embedding settings are not used",
                indices_path,
                *self.top_indices.shape,
            )
        else:
            self.eval_dataset = needs_target("near", eval_dataset)
        self.embedding = EmbeddingSettings(
            encoder=encoder, layer=layer, text=text, max_length=max_length, batch_size=batch_size
        )
        self.max_K, self.exact_threshold = max_K, exact_threshold
        self.tokenizer_path = tokenizer_path

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        positive_int("near", "max_K", params["max_K"])
        positive_int("near", "exact_threshold", params["exact_threshold"])
        check_file("near", "indices_path", params.get("indices_path"))

    @property
    def needs_model(self) -> bool:
        return self.top_indices is None and super().needs_model

    def state_dict(self) -> dict[str, Any]:
        # The file's content joins the run's selection key: a regenerated file at the same path is not reused.
        return {"indices_sha256": self.file_sha256} if self.top_indices is not None else {}

    def compute_features(
        self, model: torch.nn.Module | None, step_id: int, *, base_model_id: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        if self.top_indices is not None:
            m, k = self.top_indices.shape
            return {
                "indices_path": str(self.indices_path),
                "sha256": self.file_sha256,
                "queries": m,
                "max_K": k,
                "cache_hit": True,
            }
        pool, target = self.embed_pool_and_target(model, step_id, base_model_id, kwargs)
        ref, _, _ = cached_neighbors(self._root(), pool, target, self.max_K, self.exact_threshold)
        return {
            "pool": pool,
            "target": target,
            "neighbors": ref,
            "cache_hit": pool["status"] == target["status"] == ref["status"] == "hit",
        }

    def select(self, model: torch.nn.Module | None, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        if self.top_indices is not None:
            return self._select_precomputed(num_samples)
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        dist, idx = load_neighbors(feats["neighbors"])
        picked = near_order(idx, num_samples)
        if len(picked) < min(num_samples, len(self.dataset)):
            picked += _by_distance(feats, set(picked), min(num_samples, len(self.dataset)) - len(picked))
        picked = fill_to(picked, num_samples)
        self.last_metric = {"mean_neighbor_distance": float(np.mean(dist)), "max_K": int(idx.shape[1])}
        return broadcast_object(self.accelerator, picked)  # rank 0's choice everywhere

    def _select_precomputed(self, num_samples: int) -> list[int]:
        assert self.top_indices is not None
        picked = near_order(self.top_indices, num_samples)
        if len(picked) < num_samples:
            logger.warning(
                "near: %s holds %d distinct rows for %d samples; repeating them (DataFlex stopped)",
                self.indices_path,
                len(picked),
                num_samples,
            )
        self.last_metric = {"queries": int(self.top_indices.shape[0]), "max_K": int(self.top_indices.shape[1])}
        return fill_to(picked, num_samples)  # the same file on every rank: the same choice, no broadcast needed


def _by_distance(feats: dict[str, Any], taken: set[int], count: int) -> list[int]:
    """`count` rows not in `taken`, closest (to any query) first."""
    pool, target = EmbeddingStore.load(feats["pool"]), EmbeddingStore.load(feats["target"])
    best = torch.full((len(pool),), float("inf"))
    for s in range(0, len(pool), 4096):
        best[s : s + 4096] = torch.cdist(pool[s : s + 4096], target).min(dim=1).values
    if taken:
        best[torch.tensor(sorted(taken))] = float("inf")
    order = torch.sort(best, stable=True).indices.tolist()
    return order[:count]
