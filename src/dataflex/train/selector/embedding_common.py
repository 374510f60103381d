"""Shared plumbing of the embedding selectors (`near`, `tsds`, `cluster_less`): settings, the tokenizer that turns
the processed rows back into text, the cached embedding / neighbour artefacts, and a rank-0 broadcast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from dataflex.core.errors import ConfigError
from dataflex.distributed.collectives import cached_for_all, main_process_writes
from dataflex.features.embeddings import MODEL_ENCODER, EmbeddingSettings, EmbeddingStore
from dataflex.features.neighbors import EXACT_THRESHOLD, knn
from dataflex.utils.io import atomic_write_bytes, sha256_json
from dataflex.utils.logging import logger

NEIGHBOR_CODE_VERSION = "1"


def positive_int(selector: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"selector '{selector}': {key} must be an integer >= 1, got {value!r}")
    return value


def needs_target(selector: str, eval_dataset: Any) -> Any:
    if eval_dataset is None or len(eval_dataset) == 0:
        raise ConfigError(f"selector '{selector}' needs an eval_dataset (the target task's examples); set eval_dataset")
    return eval_dataset


class EmbeddingMixin:
    """Embeds the pool and the target through an `EmbeddingStore` under `<cache_dir>/embeddings`."""

    dataset: Any
    eval_dataset: Any
    cache_dir: str | None
    embedding: EmbeddingSettings
    tokenizer_path: str | None

    @property
    def needs_model(self) -> bool:
        return self.embedding.encoder == MODEL_ENCODER

    def _root(self) -> Path:
        return Path(self.cache_dir or "data/04_feature")

    def _tokenizer(self, model: Any, kwargs: dict[str, Any]) -> tuple[Any, str | None]:
        if self.embedding.encoder == MODEL_ENCODER:
            return None, None
        return resolve_tokenizer(self.tokenizer_path, model, kwargs)

    def embed_pool_and_target(
        self, model: Any, step_id: int, base_model_id: str | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.needs_model and model is None:
            raise ConfigError("embedding encoder 'model' needs the training model")
        tok, tok_id = self._tokenizer(model, kwargs)
        store = EmbeddingStore(self._root() / "embeddings")
        common = {"model": model, "tokenizer": tok, "base_model_id": base_model_id, "tokenizer_id": tok_id}
        pool = store.embed(self.dataset, self.embedding, name=f"pool@step-{step_id}", progress=True, **common)
        target = store.embed(self.eval_dataset, self.embedding, name=f"target@step-{step_id}", **common)
        return pool, target


def resolve_tokenizer(tokenizer_path: str | None, model: Any, kwargs: dict[str, Any]) -> tuple[Any, str | None]:
    """The training tokenizer: passed in (`tokenizer=`), else `tokenizer_path`, else the training model's folder."""
    if kwargs.get("tokenizer") is not None:
        tok = kwargs["tokenizer"]
        return tok, getattr(tok, "name_or_path", None)
    path = tokenizer_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not Path(path).is_dir():
        raise ConfigError(
            "the training tokenizer is needed to decode the rows into text: set tokenizer_path to the "
            "training model's folder"
        )
    from dataflex.models import load_tokenizer

    return load_tokenizer(path), str(path)


def cached_neighbors(
    root: Path, pool_ref: dict[str, Any], target_ref: dict[str, Any], k: int, exact_threshold: int = EXACT_THRESHOLD
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(ref, distances [M, K], indices [M, K]) of the target's K nearest pool rows, stored under
    `<root>/neighbors/<key>.safetensors` (key: both embeddings' keys, K, search settings)."""
    key = sha256_json(
        {
            "pool": pool_ref["key"],
            "target": target_ref["key"],
            "k": k,
            "exact_threshold": exact_threshold,
            "version": NEIGHBOR_CODE_VERSION,
        }
    )
    path = root / "neighbors" / f"{key[:32]}.safetensors"
    if cached_for_all(path):  # launched workers: one decision, one writer (the search itself is cheap)
        t = load_file(str(path))
        logger.info("neighbours: cache hit %s", path)
        return {"path": str(path), "key": key, "status": "hit"}, t["distances"].numpy(), t["indices"].numpy()
    dist, idx = knn(EmbeddingStore.load(pool_ref), EmbeddingStore.load(target_ref), k, exact_threshold=exact_threshold)
    with main_process_writes() as writer:
        if writer:
            tensors = {"distances": torch.from_numpy(dist).contiguous(), "indices": torch.from_numpy(idx).contiguous()}
            atomic_write_bytes(path, save(tensors, metadata={"key": key}))
    return {"path": str(path), "key": key, "status": "computed"}, dist, idx


def load_neighbors(ref: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    t = load_file(ref["path"])
    return t["distances"].numpy(), t["indices"].numpy()


def fill_to(picked: list[int], num_samples: int) -> list[int]:
    """More requested than distinct rows: repeat the ranking (as `less` does)."""
    if len(picked) >= num_samples or not picked:
        return picked[:num_samples]
    return (picked * (num_samples // len(picked) + 1))[:num_samples]
