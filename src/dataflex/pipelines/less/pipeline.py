"""`less`: process -> targets -> warm-up -> per checkpoint (pool features, target features) -> select -> final
training -> evaluate -> report. Checkpoint rounds are namespaces `less.ckpt_<k>`, one per warm-up epoch; their
count comes from the parameters (`less.warmup_epochs`)."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.params import rounds
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import (
    final_train,
    plot_composition,
    plot_scores,
    prepare_targets,
    select,
    target_features_at,
    train_features_at,
    warmup,
)

FEATURE_INPUTS = ["warmup_result", "run_config"]  # inside ckpt_<k>: mapped onto the less.* datasets below


def create_pipeline(n_checkpoints: int | None = None, **kwargs: Any) -> Pipeline:
    n = n_checkpoints if n_checkpoints is not None else rounds("less")
    head = Pipeline(
        [
            Node(
                prepare_targets,
                ["raw_inputs", "run_config"],
                "less.target_sets",
                name="prepare_targets",
                namespace="less",
            ),
            Node(
                warmup,
                ["train_pool", "run_config"],
                "less.warmup_result",
                name="warmup",
                namespace="less",
            ),
        ]
    )
    checkpoints = [
        Pipeline(
            [
                Node(train_features_at(k), ["train_pool", *FEATURE_INPUTS], "train_features", name="train_features"),
                Node(
                    target_features_at(k),
                    ["target_sets", *FEATURE_INPUTS],
                    "target_features",
                    name="target_features",
                ),
            ],
            namespace=f"less.ckpt_{k}",
            inputs={
                "train_pool": "train_pool",
                "target_sets": "less.target_sets",
                "warmup_result": "less.warmup_result",
                "run_config": "run_config",
            },
        )
        for k in range(n)
    ]
    refs = [f"less.ckpt_{k}.train_features" for k in range(n)] + [f"less.ckpt_{k}.target_features" for k in range(n)]
    tail = Pipeline(
        [
            Node(
                select,
                ["train_pool", "less.target_sets", "less.warmup_result", "run_config", *refs],
                "less.selection",
                name="select",
                namespace="less",
            ),
            Node(
                final_train,
                ["train_pool", "less.selection", "run_config"],
                "train_result",
                name="final_train",
                namespace="less",
            ),
            Node(
                plot_composition, "less.selection", "less.composition_plot", name="plot_composition", namespace="less"
            ),
            Node(plot_scores, "less.selection", "less.score_histogram", name="plot_scores", namespace="less"),
        ]
    )
    return data_processing() + Pipeline([head, *checkpoints, tail], tags="less") + evaluation() + reporting()
