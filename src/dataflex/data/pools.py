"""The train pool and the eval sets of a run, from the run's `data` group (cached by content)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets

from dataflex.core.errors import DataError
from dataflex.data.converters import row_to_messages, row_to_text
from dataflex.data.dataset_info import parse_dataset_names, resolve_datasets
from dataflex.data.processing import build_dataset_cached, split_validation
from dataflex.data.readers import read_rows

if TYPE_CHECKING:
    from dataflex.config import DataConfig


def build_named(names: list[str] | str, data: DataConfig, tokenizer: Any, seed: int) -> datasets.Dataset:
    return build_dataset_cached(
        data.cache_dir,
        dataset=names,
        dataset_dir=data.dataset_dir,
        tokenizer=tokenizer,
        template=data.template,
        cutoff_len=data.cutoff_len,
        stage=data.stage,
        train_on_prompt=data.train_on_prompt,
        max_samples=data.max_samples,
        packing=data.packing,
        seed=seed,
    )


def build_pools(data: DataConfig, tokenizer: Any, seed: int) -> tuple[datasets.Dataset, datasets.DatasetDict]:
    """Train pool (domain id = position in `dataset`) and one eval set per `eval_dataset` name
    (plus `validation` when `val_size` > 0)."""
    train = build_named(data.dataset, data, tokenizer, seed)
    evals: dict[str, datasets.Dataset] = {}
    if data.val_size:
        train, evals["validation"] = split_validation(train, data.val_size, seed)
    for name in parse_dataset_names(data.eval_dataset) if data.eval_dataset else []:
        evals[name] = build_named([name], data, tokenizer, seed)
    return train, datasets.DatasetDict(evals)


def check_sources(data: DataConfig) -> None:
    """Read and convert every raw row of the train and eval datasets (no tokenising): malformed lines, missing
    columns and empty files are reported before any model is loaded."""
    names = parse_dataset_names(data.dataset)
    names += parse_dataset_names(data.eval_dataset) if data.eval_dataset else []
    convert = row_to_messages if data.stage == "sft" else row_to_text
    for attr in resolve_datasets(names, data.dataset_dir):
        rows = read_rows(attr, data.dataset_dir)
        if not rows:
            raise DataError(f"dataset '{attr.name}': {attr.path(data.dataset_dir)} has no rows; add data or drop it")
        for i, row in enumerate(rows):
            convert(row, attr, i)
