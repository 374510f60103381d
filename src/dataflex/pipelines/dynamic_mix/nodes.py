"""Nodes of the unrolled dynamic-mix loop: one training segment per round, the mixer between rounds."""

from __future__ import annotations

from typing import Any

from dataflex.reporting import mixture_plot
from dataflex.tracking import log_mixture, mlflow_metrics_sink
from dataflex.train import mix


def _flex(dataflex: dict) -> dict:
    return {**dataflex, "train_type": "dynamic_mix"}


def first_segment(train_pool: Any, model: dict, train: dict, dataflex: dict) -> dict:
    return mix.train_segment(train_pool, model, train, _flex(dataflex), 0, metrics_sink=mlflow_metrics_sink())


def compute_mixture(train_pool: Any, model: dict, train: dict, dataflex: dict, prev_state: dict) -> dict:
    return mix.compute_mixture(train_pool, model, train, _flex(dataflex), prev_state)


def next_segment(train_pool: Any, model: dict, train: dict, dataflex: dict, prev_state: dict, mixture: dict) -> dict:
    return mix.train_segment(
        train_pool,
        model,
        train,
        _flex(dataflex),
        prev_state["round"] + 1,
        previous=prev_state,
        mixture=mixture,
        metrics_sink=mlflow_metrics_sink(),
    )


def finalize(last_state: dict, train_pool: Any, model: dict, train: dict, dataflex: dict, *mixtures: dict) -> dict:
    result = mix.finalize(last_state, list(mixtures), train_pool, model, train, _flex(dataflex))
    log_mixture(result["mixture_history"])
    return result


def plot_mixture(train_result: dict) -> Any:
    return mixture_plot(train_result["mixture_history"], train_result["global_step"])
