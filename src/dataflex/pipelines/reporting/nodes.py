"""Node: metrics table, loss curve and the run summary (the catalog writes it to the run's output_dir)."""

from __future__ import annotations

from typing import Any

from dataflex.reporting import loss_curve, metrics_table, run_summary
from dataflex.tracking import active_run_id, log_component


def report(train_result: dict, eval_metrics: dict, dataflex: dict) -> tuple[dict, Any, str]:
    log_component(train_result.get("component"))
    summary = run_summary(
        train_result, eval_metrics, component_name=dataflex.get("component_name"), mlflow_run_id=active_run_id()
    )
    title = f"{train_result.get('train_type')} training loss"
    return summary, loss_curve(train_result.get("log_history", []), title=title), metrics_table(eval_metrics)
