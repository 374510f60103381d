"""Thin nodes over `dataflex.train.static_select` (one-shot selection with any selector, then final training)."""

from __future__ import annotations

from typing import Any

import mlflow

from dataflex.models import load_tokenizer
from dataflex.reporting import selection_composition_plot
from dataflex.tracking import metric_key, mlflow_metrics_sink
from dataflex.train import less as less_lib
from dataflex.train import static_select as lib


def prepare_targets(raw_inputs: dict, data: dict, train: dict, static_select: dict) -> Any:
    cfg = lib.config(static_select)
    lib.check_config(cfg, data)
    return less_lib.build_targets(data, cfg, load_tokenizer(raw_inputs["model_name_or_path"]), seed=train["seed"])


def warmup(train_pool: Any, model: dict, train: dict, static_select: dict) -> dict:
    return lib.warmup(
        train_pool, model, train, lib.config(static_select), metrics_sink=mlflow_metrics_sink("static_select/warmup/")
    )


def compute_features(
    train_pool: Any, target_sets: Any, warmup_result: dict, model: dict, train: dict, static_select: dict
) -> dict:
    feats = lib.compute_features(train_pool, target_sets, warmup_result, model, train, lib.config(static_select))
    _log(
        {
            "static_select/features_seconds": feats["seconds"],
            "static_select/features_cache_hit": float(bool((feats["features"] or {}).get("cache_hit"))),
        }
    )
    return feats


def select(
    train_pool: Any,
    target_sets: Any,
    warmup_result: dict,
    features: dict,
    model: dict,
    train: dict,
    static_select: dict,
    data: dict,
) -> dict:
    sel = lib.select(train_pool, target_sets, warmup_result, features, model, train, lib.config(static_select), data)
    for target in sel["targets"].values():
        total = max(1, sum(target["domain_counts"].values()))
        _log({f"static_select/fraction/{d}": c / total for d, c in target["domain_counts"].items()})
        _log({"static_select/select_seconds": target["select_seconds"]})
    return sel


def final_train(train_pool: Any, selection: dict, model: dict, train: dict, static_select: dict) -> dict:
    return lib.final_train(
        train_pool, selection, model, train, lib.config(static_select), metrics_sink=mlflow_metrics_sink()
    )


def plot_composition(selection: dict) -> Any:
    return selection_composition_plot(selection)


def _log(metrics: dict[str, float]) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})
