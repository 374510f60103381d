from kedro.pipeline import Node, Pipeline

from .nodes import evaluate, trained_model


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    """The trained adapter / model as a catalog dataset (verified complete), then its evaluation."""
    return Pipeline(
        [
            Node(trained_model, "train_result", "trained_model", name="trained_model"),
            Node(evaluate, ["trained_model", "eval_sets", "run_config"], "eval_metrics", name="evaluate"),
        ],
        tags="evaluation",
    )
