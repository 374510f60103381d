from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.params import config_inputs, resolve_config

from .nodes import describe_pool, prepare_inputs, process_data, process_mixer_eval


def create_pipeline(**kwargs) -> Pipeline:  # noqa: ANN003
    """The run's configuration parsed once (`run_config`, read by every node), then the tokenised data: the train
    pool, the eval sets and a mixer's held-out sets (`mixer_eval_dataset`)."""
    return Pipeline(
        [
            Node(resolve_config, config_inputs(), "run_config", name="resolve_config"),
            Node(prepare_inputs, "run_config", "raw_inputs", name="prepare_inputs"),
            Node(process_data, ["raw_inputs", "run_config"], ["train_pool", "eval_sets"], name="process_data"),
            Node(process_mixer_eval, ["raw_inputs", "run_config"], "mixer_eval_sets", name="process_mixer_eval"),
            Node(describe_pool, "train_pool", "train_pool_stats", name="describe_pool"),
        ],
        tags="data_processing",
    )
