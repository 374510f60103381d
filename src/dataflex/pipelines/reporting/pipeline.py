from kedro.pipeline import Node, Pipeline

from .nodes import report


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    return Pipeline(
        [
            Node(
                report,
                ["train_result", "eval_metrics", "params:dataflex"],
                ["run_summary", "loss_curve", "metrics_table"],
                name="report",
            )
        ],
        tags="reporting",
    )
