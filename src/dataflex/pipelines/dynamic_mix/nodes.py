"""Nodes of the unrolled dynamic-mix loop: one training segment per round, the mixer between rounds."""

from __future__ import annotations

from typing import Any

from dataflex.pipelines.params import run_config
from dataflex.reporting import mixture_plot
from dataflex.tracking import log_mixture, mlflow_metrics_sink
from dataflex.train.modes import mix


def _cfg(parameters: dict) -> Any:
    return run_config(parameters, "dynamic_mix")


def first_segment(train_pool: Any, parameters: dict) -> dict:
    return mix.train_segment(_cfg(parameters), train_pool, 0, metrics_sink=mlflow_metrics_sink())


def compute_mixture(train_pool: Any, parameters: dict, prev_state: dict) -> dict:
    return mix.compute_mixture(_cfg(parameters), train_pool, prev_state)


def next_segment(train_pool: Any, parameters: dict, prev_state: dict, mixture: dict) -> dict:
    k = prev_state["round"] + 1
    return mix.train_segment(_cfg(parameters), train_pool, k, prev_state, mixture, metrics_sink=mlflow_metrics_sink())


def finalize(last_state: dict, *mixtures: dict) -> tuple[dict, list]:
    result = mix.finalize(last_state, list(mixtures))
    log_mixture(result["mixture_history"])
    return result, result["mixture_history"]


def all_rounds(train_pool: Any, parameters: dict) -> tuple[dict, list]:
    """Every round in one node: when the round count depends on the pool's size (`update_times <= 0` bounded by
    the epochs), the pipeline cannot unroll them before the data is read."""
    result = mix.run_all(_cfg(parameters), train_pool, metrics_sink=mlflow_metrics_sink())
    log_mixture(result["mixture_history"])
    return result, result["mixture_history"]


def plot_mixture(train_result: dict) -> Any:
    return mixture_plot(train_result["mixture_history"], train_result["global_step"])
