"""Node: static training with the run core."""

from __future__ import annotations

from typing import Any

from dataflex.pipelines.params import run_config
from dataflex.tracking import mlflow_metrics_sink
from dataflex.train import run


def train(train_pool: Any, eval_sets: Any, parameters: dict) -> dict[str, Any]:
    cfg = run_config(parameters, "static")
    return run.train(cfg, train_pool, "static", eval_sets=eval_sets, metrics_sink=mlflow_metrics_sink())
