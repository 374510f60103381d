"""Nodes of the unrolled dynamic-select loop: per round, the selection (features, then choice) and a segment."""

from __future__ import annotations

from typing import Any

from dataflex.pipelines.params import run_config
from dataflex.reporting import selection_rounds_plot
from dataflex.tracking import log_metrics, mlflow_metrics_sink
from dataflex.train.modes import select


def _cfg(parameters: dict) -> Any:
    return run_config(parameters, "dynamic_select")


def first_segment(train_pool: Any, eval_sets: Any, parameters: dict) -> dict:
    return select.train_segment(_cfg(parameters), train_pool, eval_sets, 0, metrics_sink=mlflow_metrics_sink())


def select_round(train_pool: Any, eval_sets: Any, parameters: dict, prev_state: dict) -> tuple[dict, dict]:
    features, sel = select.select_round(_cfg(parameters), train_pool, eval_sets, prev_state)
    total = max(1, sum(sel["domain_counts"].values()))
    metrics = {f"select/fraction/{d}": c / total for d, c in sel["domain_counts"].items()}
    log_metrics({**metrics, "select/cache_hit": float(sel["cache"] == "hit")}, step=sel["step"])
    return features, sel


def next_segment(train_pool: Any, eval_sets: Any, parameters: dict, prev_state: dict, selection: dict) -> dict:
    k = prev_state["round"] + 1
    sink = mlflow_metrics_sink()
    return select.train_segment(_cfg(parameters), train_pool, eval_sets, k, prev_state, selection, metrics_sink=sink)


def finalize(last_state: dict, *selections: dict) -> tuple[dict, list]:
    result = select.finalize(last_state, list(selections))
    return result, result["selection_history"]


def all_rounds(train_pool: Any, eval_sets: Any, parameters: dict) -> tuple[dict, list]:
    """Every round in one node: when the round count depends on the pool's size (`update_times <= 0` bounded by
    the epochs), the pipeline cannot unroll them before the data is read."""
    result = select.run_all(_cfg(parameters), train_pool, eval_sets, metrics_sink=mlflow_metrics_sink())
    return result, result["selection_history"]


def plot_selection(train_result: dict) -> Any:
    return selection_rounds_plot(train_result["selection_history"], train_result["domains"])
