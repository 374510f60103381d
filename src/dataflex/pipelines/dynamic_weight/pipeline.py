from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import plot_weights, train


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    """The whole dynamic-weight job: process -> train with the weighter -> evaluate -> report (+ weight plot)."""
    training = Pipeline(
        [
            Node(
                train,
                ["train_pool", "eval_sets", "run_config"],
                "train_result",
                name="train_dynamic_weight",
            ),
            Node(plot_weights, "train_result", "weights_plot", name="plot_weights"),
        ],
        tags="dynamic_weight",
    )
    return data_processing() + training + evaluation() + reporting()
