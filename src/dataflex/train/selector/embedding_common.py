"""Shared plumbing of the embedding selectors (`near`, `tsds`, `cluster_less`, `nice`): settings, the tokenizer that
turns the processed rows back into text, the cached embedding / neighbour artefacts, DataFlex's precomputed `.npy`
files, and DataFlex parameter names that are aliases of ours or meaningless here. Also what the target-matching
selectors (`less`, `cluster_less`, `nice`) share: their common parameter checks, LESS's subtasks of the target rows
(`subtask_column`) and the memory of `exclude_selected`."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from dataflex.core.errors import ConfigError, DataError
from dataflex.distributed.collectives import cached_for_all, main_process_writes
from dataflex.features.embeddings import MODEL_ENCODER, EmbeddingSettings, EmbeddingStore
from dataflex.features.gradients import GRADIENT_TYPES
from dataflex.features.neighbors import EXACT_THRESHOLD, knn
from dataflex.utils.io import atomic_write_bytes, sha256_json
from dataflex.utils.logging import logger

NEIGHBOR_CODE_VERSION = "1"


def positive_int(selector: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"selector '{selector}': {key} must be an integer >= 1, got {value!r}")
    return value


def signature_default(cls: type, name: str) -> Any:
    """The constructor default of `name`: the one home of a default that a DataFlex alias shares."""
    return inspect.signature(cls.__init__).parameters[name].default


def alias(cls: type, selector: str, params: Mapping[str, Any], ours: str, theirs: str) -> Any:
    """The value of a setting with our name and DataFlex's (`theirs`, default None): DataFlex's when given, else
    ours; both given with different values is an error."""
    default = signature_default(cls, ours)
    mine, other = params.get(ours, default), params.get(theirs)
    if other is None:
        return mine
    if mine != default and mine != other:
        raise ConfigError(
            f"selector '{selector}': {theirs} (DataFlex's name) and {ours} are one setting; set one of them, "
            f"got {ours}={mine!r} and {theirs}={other!r}"
        )
    return other


def notice_unused(selector: str, key: str, value: Any, why: str) -> None:
    """One logged line for a DataFlex parameter that is accepted but has no effect here."""
    if value is not None:
        logger.info("selector '%s': %s=%r is accepted and ignored: %s", selector, key, value, why)


SAVE_INTERVAL_WHY = "DataFlex's gradient chunk size; features here are computed in batches and stored by the datastore"


def check_file(selector: str, key: str, path: Any) -> None:
    """A path parameter that must name an existing file (checked at config time)."""
    if path is None:
        return
    if not isinstance(path, str | Path) or not str(path):
        raise ConfigError(f"selector '{selector}': {key} must be a file path, got {path!r}")
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"selector '{selector}': {key} {str(path)!r} does not exist (or is not a file)")


def load_npy(selector: str, key: str, path: str | Path) -> np.ndarray:
    """A plain `.npy` array (DataFlex's offline files); anything else is one DataError line."""
    try:
        arr = np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"selector '{selector}': {key} {str(path)!r} is not a readable .npy array ({reason})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise DataError(f"selector '{selector}': {key} {str(path)!r} is an .npz archive, not one .npy array")
    return arr


def load_top_indices(path: str | Path, pool_size: int) -> np.ndarray:
    """DataFlex's `top_indices.npy` ([queries, K] integer pool rows, each query's neighbours nearest first),
    checked against the pool."""
    arr = load_npy("near", "indices_path", path)
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(
            f"selector 'near': indices_path {str(path)!r} must hold a non-empty [queries, K] matrix "
            f"(DataFlex's top_indices.npy), got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"selector 'near': indices_path {str(path)!r} must hold integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= pool_size:
        raise DataError(
            f"selector 'near': indices_path {str(path)!r} holds rows {lo}..{hi} but the pool has {pool_size} rows "
            f"(0..{pool_size - 1}); compute it for this pool (dataflex-cli offline-select near)"
        )
    return arr.astype(np.int64)


def load_probs(path: str | Path, pool_size: int) -> np.ndarray:
    """DataFlex's `tsds_probs.npy` ([pool size] sampling probabilities), checked against the pool."""
    arr = load_npy("tsds", "probs_path", path)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(
            f"selector 'tsds': probs_path {str(path)!r} must hold a 1-D numeric vector (DataFlex's tsds_probs.npy), "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    if len(arr) != pool_size:
        raise DataError(
            f"selector 'tsds': probs_path {str(path)!r} has {len(arr)} probabilities but the pool has {pool_size} "
            "rows; compute it for this pool (dataflex-cli offline-select tsds)"
        )
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all() or (arr < 0).any() or arr.sum() <= 0:
        raise DataError(
            f"selector 'tsds': probs_path {str(path)!r} must hold finite, non-negative probabilities with a "
            "positive sum"
        )
    return arr


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


# ----------------------------------------------------------------------------- target-matching selectors

# Columns of the tokenised rows (dataflex.data.processing): a subtask column names a raw-data column instead.
PROCESSED_COLUMNS = ("input_ids", "labels", "sample_id", "domain_id", "source_row")

SUBTASK_COLUMN_WHY = "aggregation is mean (over every target row); subtasks matter only to aggregation: max"


def check_target_params(selector: str, params: Mapping[str, Any]) -> None:
    """The checks `less`, `cluster_less` and `nice` share: gradient type, exclude_selected, subtask_column."""
    gradient_type = params.get("gradient_type")
    if gradient_type not in GRADIENT_TYPES:
        raise ConfigError(
            f"selector '{selector}': gradient_type must be one of {', '.join(GRADIENT_TYPES)}, got {gradient_type!r}"
        )
    if not isinstance(params.get("exclude_selected", False), bool):
        raise ConfigError(
            f"selector '{selector}': exclude_selected must be true or false, got {params['exclude_selected']!r}"
        )
    column = params.get("subtask_column")
    if column is None:
        return
    if not isinstance(column, str) or not column.strip():
        raise ConfigError(
            f"selector '{selector}': subtask_column must name a column of the target's raw rows (e.g. subject), "
            f"got {column!r}"
        )
    if column in PROCESSED_COLUMNS:
        raise ConfigError(
            f"selector '{selector}': subtask_column names a column of the target's raw rows (e.g. subject); "
            f"{column!r} is a column of the tokenised rows"
        )


def target_subtasks(selector: str, eval_dataset: Any, column: str | None) -> list[int] | None:
    """LESS's subtasks of the target rows (the groups of its max over subtasks): each eval set (`domain_id`), split
    further by the value of the raw-data column `column` when it is set; None: all rows are one subtask."""
    cols = list(getattr(eval_dataset, "column_names", None) or [])
    sets = list(eval_dataset["domain_id"]) if "domain_id" in cols else None
    if column is None:
        return sets
    if column not in cols:
        raise ConfigError(
            f"selector '{selector}': subtask_column {column!r} is not a column of the target rows; dynamic_select "
            "and static_select carry it from the dev files' raw rows, a hand-built eval_dataset needs it as a column"
        )
    ids: dict[tuple[int, str], int] = {}
    keys = zip(sets if sets is not None else [0] * len(eval_dataset), eval_dataset[column])
    return [ids.setdefault((int(s), str(v)), len(ids)) for s, v in keys]


class SelectionMemory:
    """`exclude_selected`: a selection never picks a row that an earlier selection of the same flex epoch picked.

    The memory (the rows picked so far and their flex epoch) is the selector's `state_dict`, carried in TrainState, so
    a resumed run excludes exactly what the uninterrupted one did. It is per flex epoch (`flex_epoch`, which the
    select mode sets before every `select`): a new flex epoch restarts the pass over the pool with an empty memory
    (with update_times <= 0 and train_step > 0 the run is one flex epoch). When the rows left are fewer than the
    budget, `take` is a ConfigError; dynamic_select checks that before training (`check_select_config`)."""

    flex_epoch: int = 0
    exclude_selected: bool = False
    _memory_epoch: int = 0
    _memory: frozenset[int] = frozenset()  # replaced, never mutated: the class default stays empty

    def excluded(self) -> frozenset[int]:
        """The rows this selection may not pick."""
        if not self.exclude_selected or self._memory_epoch != self.flex_epoch:
            return frozenset()
        return self._memory

    def take(self, selector: str, ranking: Iterable[int], num_samples: int) -> list[int]:
        """The first `num_samples` rows of `ranking` (best first) that are not excluded, remembered. Without
        exclusion a ranking shorter than the budget repeats (the selectors' behaviour before this option)."""
        excluded = self.excluded()
        picked = [int(i) for i in ranking if i not in excluded][:num_samples]
        if not self.exclude_selected:
            return fill_to(picked, num_samples)
        if len(picked) < num_samples:
            raise ConfigError(
                f"selector '{selector}': exclude_selected leaves {len(picked)} unpicked rows in flex epoch "
                f"{self.flex_epoch} but {num_samples} are asked for; lower update_step, update_times or the batch "
                "size, or set exclude_selected: false"
            )
        self._memory, self._memory_epoch = excluded | frozenset(picked), self.flex_epoch
        return picked

    def state_dict(self) -> dict[str, Any]:
        if not self.exclude_selected:
            return {}  # nothing remembered: the state (and the selection cache key) of a selector without it
        return {"selected_flex_epoch": self._memory_epoch, "selected_rows": sorted(self._memory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._memory_epoch = int(state.get("selected_flex_epoch", 0))
        self._memory = frozenset(int(i) for i in state.get("selected_rows", ()))
