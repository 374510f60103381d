"""The train pool, the eval sets and the mixer's held-out sets of a run, from the run's `data` group (cached by
content)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from dataflex.core.errors import DataError
from dataflex.data.converters import row_to_messages, row_to_text
from dataflex.data.dataset_info import parse_dataset_names, resolve_datasets
from dataflex.data.processing import FEATURES, build_dataset_cached, processing_fingerprint, split_validation
from dataflex.data.readers import read_rows

if TYPE_CHECKING:
    from dataflex.config import DataConfig


def _build_kwargs(names: list[str] | str, data: DataConfig, tokenizer: Any, seed: int) -> dict[str, Any]:
    return {
        "dataset": names,
        "dataset_dir": data.dataset_dir,
        "tokenizer": tokenizer,
        "template": data.template,
        "cutoff_len": data.cutoff_len,
        "stage": data.stage,
        "train_on_prompt": data.train_on_prompt,
        "max_samples": data.max_samples,
        "packing": data.packing,
        "seed": seed,
    }


def build_named(names: list[str] | str, data: DataConfig, tokenizer: Any, seed: int) -> datasets.Dataset:
    return build_dataset_cached(data.cache_dir, **_build_kwargs(names, data, tokenizer, seed))


def eval_names(data: DataConfig) -> list[str]:
    """The `eval_dataset` names (each at most once; a training set may be one of them)."""
    return parse_dataset_names(data.eval_dataset, "eval_dataset") if data.eval_dataset else []


def domain_subset(
    pool: datasets.Dataset, domain_id: int, names: list[str], data: DataConfig, tokenizer: Any, seed: int
) -> datasets.Dataset:
    """Domain `domain_id` of a pool built from `names`, as the very dataset `build_named([its name])` gives
    (fresh 0.. sample ids, domain id 0, that build's metadata and fingerprint), without tokenising it again:
    each domain is tokenised on its own, so its rows in the pool are exactly those of a one-name build."""
    name = names[domain_id]
    meta = json.loads(pool.info.description)
    idx = np.flatnonzero(np.asarray(pool["domain_id"], dtype=np.int64) == domain_id)
    n = len(idx)
    sub = pool.select(idx).flatten_indices(keep_in_memory=True).remove_columns(["sample_id", "domain_id"])
    sub = sub.add_column("sample_id", list(range(n))).add_column("domain_id", [0] * n)
    sub = sub.select_columns(list(FEATURES)).cast(FEATURES)  # build_dataset's column order and types
    meta.update(
        domains=[name],
        domain_sizes=[n],
        fingerprint=processing_fingerprint(**_build_kwargs([name], data, tokenizer, seed)),
    )
    sub.info.description = json.dumps(meta)
    return sub


def build_pools(data: DataConfig, tokenizer: Any, seed: int) -> tuple[datasets.Dataset, datasets.DatasetDict]:
    """Train pool (domain id = position in `dataset`) and one eval set per `eval_dataset` name
    (plus `validation` when `val_size` > 0). An eval set that is also a training set is cut out of the pool
    (before the `val_size` split), not tokenised twice."""
    train_names = parse_dataset_names(data.dataset)
    pool = build_named(train_names, data, tokenizer, seed)
    train = pool
    evals: dict[str, datasets.Dataset] = {}
    if data.val_size:
        train, evals["validation"] = split_validation(pool, data.val_size, seed)
    for name in eval_names(data):
        if name in train_names:
            evals[name] = domain_subset(pool, train_names.index(name), train_names, data, tokenizer, seed)
        else:
            evals[name] = build_named([name], data, tokenizer, seed)
    return train, datasets.DatasetDict(evals)


def mixer_eval_names(mixer_eval_dataset: Any) -> list[str]:
    """The `mixer_eval_dataset` names (one per domain, in the order of `dataset`), or [] when unset."""
    if mixer_eval_dataset is None:
        return []
    return parse_dataset_names(mixer_eval_dataset, "mixer_eval_dataset")


def build_mixer_eval_sets(data: DataConfig, mixer_eval_dataset: Any, tokenizer: Any, seed: int) -> datasets.DatasetDict:
    """One tokenised set per `mixer_eval_dataset` name (keyed by it; empty when unset), built like the train
    pool (same template, cutoff and stage) so a mixer's eval rows look like training rows."""
    return datasets.DatasetDict(
        {name: build_named([name], data, tokenizer, seed) for name in mixer_eval_names(mixer_eval_dataset)}
    )


def check_sources(data: DataConfig, mixer_eval_dataset: Any = None) -> None:
    """Read and convert every raw row of the train, eval and `mixer_eval_dataset` datasets (no tokenising):
    unknown names, malformed lines, missing columns and empty files are reported before any model is loaded. A
    name in several lists is read once."""
    from dataflex.core.errors import ConfigError

    train_names = parse_dataset_names(data.dataset)
    names = train_names + [n for n in eval_names(data) if n not in train_names]
    mixer_names = mixer_eval_names(mixer_eval_dataset)
    if mixer_names:
        try:
            resolve_datasets(mixer_names, data.dataset_dir, "mixer_eval_dataset")
        except DataError as exc:  # say which setting named it: the message alone reads like a `dataset` typo
            raise ConfigError(f"mixer_eval_dataset: {exc}") from None
    names += [n for n in mixer_names if n not in names]
    convert = row_to_messages if data.stage == "sft" else row_to_text
    for attr in resolve_datasets(names, data.dataset_dir):
        rows = read_rows(attr, data.dataset_dir)
        if not rows:
            raise DataError(
                f"dataset '{attr.name}': {attr.location(data.dataset_dir)} has no rows; add data or drop it"
            )
        for i, row in enumerate(rows):
            convert(row, attr, i)
