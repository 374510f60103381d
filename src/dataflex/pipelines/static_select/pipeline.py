"""`static_select`: process -> targets -> [warm-up] -> compute_features -> select -> final training -> evaluate ->
report, with the selector named in `static_select.selector` (NEAR, TSDS, ClusterLESS, NICE or any other)."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import compute_features, final_train, plot_composition, prepare_targets, select, warmup

P = ["run_config"]


def create_pipeline(**kwargs: Any) -> Pipeline:
    core = Pipeline(
        [
            Node(
                prepare_targets,
                ["raw_inputs", "run_config"],
                "static_select.target_sets",
                name="prepare_targets",
                namespace="static_select",
            ),
            Node(warmup, ["train_pool", *P], "static_select.warmup_result", name="warmup", namespace="static_select"),
            Node(
                compute_features,
                ["train_pool", "static_select.target_sets", "static_select.warmup_result", *P],
                "static_select.features",
                name="compute_features",
                namespace="static_select",
            ),
            Node(
                select,
                [
                    "train_pool",
                    "static_select.target_sets",
                    "static_select.warmup_result",
                    "static_select.features",
                    *P,
                ],
                "static_select.selection",
                name="select",
                namespace="static_select",
            ),
            Node(
                final_train,
                ["train_pool", "static_select.selection", *P],
                "train_result",
                name="final_train",
                namespace="static_select",
            ),
            Node(
                plot_composition,
                "static_select.selection",
                "static_select.composition_plot",
                name="plot_composition",
                namespace="static_select",
            ),
        ],
        tags="static_select",
    )
    return data_processing() + core + evaluation() + reporting()
