"""Nodes of the unrolled dynamic-select loop: features -> selection -> training segment per round."""

from __future__ import annotations

from typing import Any

import mlflow

from dataflex.reporting import selection_rounds_plot
from dataflex.tracking import metric_key, mlflow_metrics_sink
from dataflex.train import select


def _flex(dataflex: dict) -> dict:
    return {**dataflex, "train_type": "dynamic_select"}


def first_segment(train_pool: Any, eval_sets: Any, model: dict, train: dict, dataflex: dict) -> dict:
    return select.train_segment(
        train_pool, eval_sets, model, train, _flex(dataflex), 0, metrics_sink=mlflow_metrics_sink()
    )


def compute_features(
    train_pool: Any, eval_sets: Any, model: dict, train: dict, dataflex: dict, prev_state: dict
) -> dict:
    return select.compute_features(train_pool, eval_sets, model, train, _flex(dataflex), prev_state)


def compute_selection(
    train_pool: Any, eval_sets: Any, model: dict, train: dict, dataflex: dict, prev_state: dict, features: dict
) -> dict:
    sel = select.compute_selection(train_pool, eval_sets, model, train, _flex(dataflex), prev_state, features)
    if mlflow.active_run() is not None:
        total = max(1, sum(sel["domain_counts"].values()))
        metrics = {metric_key(f"select/fraction/{d}"): c / total for d, c in sel["domain_counts"].items()}
        metrics["select/cache_hit"] = float(sel["cache"] == "hit")
        mlflow.log_metrics(metrics, step=sel["step"])
    return sel


def next_segment(
    train_pool: Any, eval_sets: Any, model: dict, train: dict, dataflex: dict, prev_state: dict, selection: dict
) -> dict:
    return select.train_segment(
        train_pool,
        eval_sets,
        model,
        train,
        _flex(dataflex),
        prev_state["round"] + 1,
        previous=prev_state,
        selection=selection,
        metrics_sink=mlflow_metrics_sink(),
    )


def finalize(last_state: dict, train_pool: Any, model: dict, train: dict, dataflex: dict, *selections: dict) -> dict:
    return select.finalize(last_state, list(selections), train_pool, model, train, _flex(dataflex))


def plot_selection(train_result: dict) -> Any:
    return selection_rounds_plot(train_result["selection_history"], train_result["domains"])
