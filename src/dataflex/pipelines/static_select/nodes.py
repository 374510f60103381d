"""Thin nodes over `dataflex.train.modes.static_select` (one-shot selection with any selector, then training)."""

from __future__ import annotations

from typing import Any

from dataflex.models import load_tokenizer
from dataflex.pipelines.params import run_config
from dataflex.reporting import selection_composition_plot
from dataflex.tracking import log_metrics, mlflow_metrics_sink
from dataflex.train.modes import less as less_lib
from dataflex.train.modes import static_select as lib


def prepare_targets(raw_inputs: dict, parameters: dict) -> Any:
    cfg = run_config(parameters)
    return less_lib.build_targets(
        cfg.data, cfg.static_select.targets, load_tokenizer(raw_inputs["model_name_or_path"]), seed=cfg.train.seed
    )


def warmup(train_pool: Any, parameters: dict) -> dict:
    return lib.warmup(run_config(parameters), train_pool, metrics_sink=mlflow_metrics_sink("static_select/warmup/"))


def compute_features(train_pool: Any, target_sets: Any, warmup_result: dict, parameters: dict) -> dict:
    feats = lib.compute_features(run_config(parameters), train_pool, target_sets, warmup_result)
    hit = float(bool((feats["features"] or {}).get("cache_hit")))
    log_metrics({"static_select/features_seconds": feats["seconds"], "static_select/features_cache_hit": hit})
    return feats


def select(train_pool: Any, target_sets: Any, warmup_result: dict, features: dict, parameters: dict) -> dict:
    sel = lib.select(run_config(parameters), train_pool, target_sets, warmup_result, features)
    for target in sel["targets"].values():
        total = max(1, sum(target["domain_counts"].values()))
        log_metrics({f"static_select/fraction/{d}": c / total for d, c in target["domain_counts"].items()})
        log_metrics({"static_select/select_seconds": target["select_seconds"]})
    return sel


def final_train(train_pool: Any, selection: dict, parameters: dict) -> dict:
    return lib.final_train(run_config(parameters), train_pool, selection, metrics_sink=mlflow_metrics_sink())


def plot_composition(selection: dict) -> Any:
    return selection_composition_plot(selection)
