"""`compare`: process -> plan (every arm x seed checked) -> one namespaced node per cell
(`compare.<arm>.seed_<s>.run_cell`, so kedro-viz shows the grid) -> leaderboard and plots. Each cell node runs the
arm's mode or recipe through the library functions its own pipeline uses (one node per cell, not the unrolled
mode pipeline: the cells share the run's tokenised pool and eval sets, and a finished cell is skipped)."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.params import current_params

from .cells import cell_names
from .nodes import cell_at, leaderboard, plan

SHARED = {"train_pool", "eval_sets", "compare_plan"}
OUTPUTS = [
    "compare.leaderboard_csv",
    "compare.leaderboard_md",
    "compare.cells_csv",
    "compare.metric_plot",
    "compare.mixture_plot",
    "compare.selection_plot",
]


def create_pipeline(cells: list[tuple[str, int]] | None = None, **kwargs: Any) -> Pipeline:
    grid = cells if cells is not None else cell_names(current_params())
    head = Pipeline([Node(plan, "run_config", "compare_plan", name="plan", namespace="compare")])
    per_cell = [
        Pipeline(
            [Node(cell_at(arm, seed), ["train_pool", "eval_sets", "compare_plan"], "summary", name="run_cell")],
            namespace=f"compare.{arm}.seed_{seed}",
            inputs=SHARED,
        )
        for arm, seed in grid
    ]
    summaries = [f"compare.{arm}.seed_{seed}.summary" for arm, seed in grid]
    tail = Pipeline(
        [
            Node(
                leaderboard,
                ["run_config", "compare_plan", *summaries],
                OUTPUTS,
                name="leaderboard",
                namespace="compare",
            )
        ]
    )
    return data_processing() + Pipeline([head, *per_cell, tail], tags="compare")
