from kedro.pipeline import Node, Pipeline

from .nodes import evaluate


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    return Pipeline(
        [
            Node(
                evaluate,
                ["train_result", "eval_sets", "parameters"],
                "eval_metrics",
                name="evaluate",
            )
        ],
        tags="evaluation",
    )
