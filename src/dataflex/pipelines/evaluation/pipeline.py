from kedro.pipeline import Node, Pipeline

from .nodes import evaluate


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    return Pipeline(
        [
            Node(
                evaluate,
                ["train_result", "eval_sets", "params:model", "params:data", "params:train", "params:eval"],
                "eval_metrics",
                name="evaluate",
            )
        ],
        tags="evaluation",
    )
