"""Nodes: dynamic-weight training (a weighter replaces the loss after warmup_step) and its weight plot."""

from __future__ import annotations

from typing import Any

from dataflex.reporting import weights_plot
from dataflex.tracking import mlflow_metrics_sink
from dataflex.train.runner import train_model


def train(train_pool: Any, eval_sets: Any, model: dict, train: dict, dataflex: dict) -> dict[str, Any]:
    flex = {**dataflex, "train_type": "dynamic_weight"}
    return train_model(train_pool, model, train, flex, eval_sets=eval_sets, metrics_sink=mlflow_metrics_sink())


def plot_weights(train_result: dict) -> Any:
    return weights_plot(train_result.get("log_history", []), title=f"{train_result.get('component_name')} weights")
