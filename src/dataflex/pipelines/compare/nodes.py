"""Thin nodes of the `compare` pipeline: the checked plan, one node per arm x seed cell, the leaderboard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dataflex.pipelines.compare import cells as lib
from dataflex.reporting import compare_metric_plot, compare_mixture_plot, compare_selection_plot
from dataflex.tracking import child_run, log_eval_metrics, log_metrics, mlflow_metrics_sink
from dataflex.utils.logging import logger


def plan(parameters: dict) -> list[dict[str, Any]]:
    """Every cell, checked as the run it will be (one ConfigError line before any training)."""
    cells = lib.plan_cells(parameters)
    todo = sum(lib.done(c) is None for c in cells)
    logger.info("compare: %d cells (%d to run, %d finished before)", len(cells), todo, len(cells) - todo)
    return [vars(c) for c in cells]


def cell_at(arm: str, seed: int) -> Callable[..., dict]:
    def run_cell(train_pool: Any, eval_sets: Any, plan: list[dict[str, Any]]) -> dict[str, Any]:
        found = [c for c in plan if c["arm"] == arm and c["seed"] == seed]
        if not found:  # the pipeline was shaped from other parameters than the run's: nothing to do here
            return {}
        cell = lib.Cell(**found[0])
        summary = lib.done(cell)
        if summary is not None:
            logger.info("compare: cell %s finished before (run_summary.json): skipped", cell.key)
            return summary
        logger.info("compare: cell %s (%s) starts", cell.key, cell.pipeline)
        params = {"arm": arm, "seed": seed, "pipeline": cell.pipeline, **_arm_params(cell)}
        with child_run(f"{arm}/seed-{seed}", params):
            summary = lib.run_cell(cell, train_pool, eval_sets, metrics_sink=mlflow_metrics_sink())
            log_eval_metrics(summary.get("eval") or {})
            log_metrics({f"compare/{k}": float(summary[k]) for k in ("wall_seconds", "feature_seconds")})
        logger.info("compare: cell %s done in %.1fs", cell.key, summary["wall_seconds"])
        return summary

    return run_cell


def _arm_params(cell: lib.Cell) -> dict[str, Any]:
    flex = cell.params.get("dataflex") or {}
    return {"train_type": flex.get("train_type"), "component_name": flex.get("component_name")}


def leaderboard(parameters: dict, plan: list[dict[str, Any]], *summaries: dict) -> tuple[str, str, str, Any, Any, Any]:
    cmp = parameters["compare"]
    metric, baseline = cmp["metric"], cmp.get("baseline")
    done = [s for s in summaries if s]
    rows = lib.leaderboard(done, metric, baseline)
    md = lib.to_markdown(rows, metric, baseline, cmp["budget_steps"])
    logger.info("compare: leaderboard\n%s", md)
    return (
        lib.to_csv(rows),
        md,
        lib.cells_csv(done, metric),
        compare_metric_plot(rows, metric),
        compare_mixture_plot({s["arm"]: s["mixture_history"] for s in done if s.get("mixture_history")}),
        compare_selection_plot({s["arm"]: s["selection_composition"] for s in done if s.get("selection_composition")}),
    )
