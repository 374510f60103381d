"""`doremi`: process -> reference -> proxy -> final -> evaluate -> report, with no manual copying of weights.
Reference and proxy train `doremi.proxy_model_name_or_path` (null: the final model), the final run
`model_name_or_path`."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import final, plot, proxy, reference

PARAMS = ["train_pool", "run_config"]


def create_pipeline(**kwargs: Any) -> Pipeline:
    steps = Pipeline(
        [
            Node(reference, PARAMS, "doremi.reference_result", name="reference", namespace="doremi"),
            Node(
                proxy,
                [*PARAMS, "doremi.reference_result"],
                ["doremi.proxy_result", "doremi.weights"],
                name="proxy",
                namespace="doremi",
            ),
            Node(
                final,
                [*PARAMS, "doremi.proxy_result"],
                ["train_result", "mixture_history"],
                name="final",
                namespace="doremi",
            ),
            Node(plot, "doremi.proxy_result", "doremi_plot", name="plot_weights", namespace="doremi"),
        ],
        tags="doremi",
    )
    return data_processing() + steps + evaluation() + reporting()
