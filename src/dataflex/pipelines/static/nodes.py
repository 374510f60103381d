"""Node: static training with the one loop."""

from __future__ import annotations

from typing import Any

from dataflex.tracking import mlflow_metrics_sink
from dataflex.train.runner import train_model


def train(train_pool: Any, model: dict, train: dict) -> dict[str, Any]:
    return train_model(train_pool, model, train, {"train_type": "static"}, metrics_sink=mlflow_metrics_sink())
