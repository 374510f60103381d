"""Nodes: raw LLaMA-Factory-style datasets -> tokenised train pool, eval sets and the mixer's held-out sets."""

from __future__ import annotations

from collections import Counter
from typing import Any

import datasets

from dataflex.data import domain_names
from dataflex.data.pools import build_mixer_eval_sets, build_pools
from dataflex.demo_assets import ensure_demo_assets
from dataflex.models import load_tokenizer
from dataflex.pipelines.params import run_config


def prepare_inputs(parameters: dict) -> dict[str, str]:
    cfg = run_config(parameters)
    return ensure_demo_assets(cfg.demo, cfg.data, cfg.model)


def process_data(inputs: dict[str, str], parameters: dict) -> tuple[datasets.Dataset, datasets.DatasetDict]:
    cfg = run_config(parameters)
    pool, evals = build_pools(cfg.data, load_tokenizer(inputs["model_name_or_path"]), seed=cfg.train.seed)
    if cfg.dataflex.train_type == "dynamic_mix":
        from dataflex.train.modes.mix import check_mixer_data

        names = domain_names(pool)
        counts = Counter(pool["domain_id"])
        check_mixer_data(cfg, {names[d]: counts.get(d, 0) for d in range(len(names))})  # before the pool is saved
    return pool, evals


def process_mixer_eval(inputs: dict[str, str], parameters: dict) -> datasets.DatasetDict:
    """The `mixer_eval_dataset` sets, tokenised (an empty DatasetDict when unset or the run mixes nothing)."""
    cfg = run_config(parameters)
    flex = cfg.dataflex
    if flex.mixer_eval_dataset is None or flex.train_type != "dynamic_mix" or flex.static_mix:
        return datasets.DatasetDict()
    tokenizer = load_tokenizer(inputs["model_name_or_path"])
    return build_mixer_eval_sets(cfg.data, flex.mixer_eval_dataset, tokenizer, seed=cfg.train.seed)


def describe_pool(train_pool: Any) -> dict[str, Any]:
    """Pool statistics for the run log and MLflow (domain sizes, token counts)."""
    names = domain_names(train_pool)
    counts = Counter(train_pool["domain_id"])
    return {"num_samples": len(train_pool), "domains": {names[d]: counts.get(d, 0) for d in range(len(names))}}
