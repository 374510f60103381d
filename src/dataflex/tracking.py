"""MLflow helpers used by nodes: log only from the main process and only inside an active run."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import mlflow

_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_key(name: str) -> str:
    return _BAD.sub("_", name)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def mlflow_metrics_sink(prefix: str = "train/") -> Callable[[dict[str, float], int], None] | None:
    """A sink for the training loop's step metrics, or None when no MLflow run is active."""
    if mlflow.active_run() is None:
        return None

    def sink(metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({metric_key(prefix + k): float(v) for k, v in metrics.items()}, step=step)

    return sink


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Node-level metrics (cache hits, timings, selection fractions) into the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


def log_eval_metrics(eval_metrics: Mapping[str, Mapping[str, Any]]) -> None:
    if mlflow.active_run() is None:
        return
    flat = {
        metric_key(f"eval/{name}/{k}"): float(v)
        for name, m in eval_metrics.items()
        for k, v in m.items()
        if isinstance(v, int | float)
    }
    mlflow.log_metrics(flat)


def log_mixture(history: list[Mapping[str, Any]]) -> None:
    """Proportions per domain at each update step (`mixture/<domain>`)."""
    if mlflow.active_run() is None:
        return
    for entry in history:
        metrics = {metric_key(f"mixture/{n}"): float(p) for n, p in zip(entry["names"], entry["proportions"])}
        mlflow.log_metrics(metrics, step=int(entry["step"]))
