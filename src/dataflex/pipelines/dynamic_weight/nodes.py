"""Nodes: dynamic-weight training (a weighter replaces the loss after warmup_step) and its weight plot."""

from __future__ import annotations

from typing import Any

from dataflex.pipelines.params import run_config
from dataflex.reporting import weights_plot
from dataflex.tracking import mlflow_metrics_sink
from dataflex.train import run


def train(train_pool: Any, eval_sets: Any, parameters: dict) -> dict[str, Any]:
    cfg = run_config(parameters, "dynamic_weight")
    return run.train(cfg, train_pool, "dynamic_weight", eval_sets=eval_sets, metrics_sink=mlflow_metrics_sink())


def plot_weights(train_result: dict) -> Any:
    return weights_plot(train_result.get("log_history", []), title=f"{train_result.get('component_name')} weights")
