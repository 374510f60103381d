from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import train


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    """The whole static job: process -> train -> evaluate -> report."""
    training = Pipeline(
        [Node(train, ["train_pool", "eval_sets", "run_config"], "train_result", name="train_static")],
        tags="static",
    )
    return data_processing() + training + evaluation() + reporting()
