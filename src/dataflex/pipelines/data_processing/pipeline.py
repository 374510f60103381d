from kedro.pipeline import Node, Pipeline

from .nodes import describe_pool, prepare_inputs, process_data


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    return Pipeline(
        [
            Node(prepare_inputs, ["params:demo", "params:data", "params:model"], "raw_inputs", name="prepare_inputs"),
            Node(
                process_data,
                ["raw_inputs", "params:data", "params:train"],
                ["train_pool", "eval_sets"],
                name="process_data",
            ),
            Node(describe_pool, "train_pool", "train_pool_stats", name="describe_pool"),
        ],
        tags="data_processing",
    )
