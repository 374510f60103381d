"""Nodes: raw LLaMA-Factory-style datasets -> tokenised train pool and eval sets."""

from __future__ import annotations

from typing import Any

import datasets

from dataflex.data.pools import build_pools
from dataflex.demo_assets import ensure_demo_assets
from dataflex.models import load_tokenizer


def prepare_inputs(demo: dict, data: dict, model: dict) -> dict[str, str]:
    return ensure_demo_assets(demo, data, model)


def process_data(inputs: dict[str, str], data: dict, train: dict) -> tuple[datasets.Dataset, datasets.DatasetDict]:
    tokenizer = load_tokenizer(inputs["model_name_or_path"])
    return build_pools(data, tokenizer, seed=train["seed"])


def describe_pool(train_pool: Any) -> dict[str, Any]:
    """Pool statistics for the run log and MLflow (domain sizes, token counts)."""
    from collections import Counter

    from dataflex.data import domain_names

    names = domain_names(train_pool)
    counts = Counter(train_pool["domain_id"])
    return {"num_samples": len(train_pool), "domains": {names[d]: counts.get(d, 0) for d in range(len(names))}}
