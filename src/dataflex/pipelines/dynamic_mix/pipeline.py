"""`dynamic_mix`: process -> round_0 (warm-up segment) -> round_k (compute_mixture -> train_segment) ... ->
finalize -> evaluate -> report. Rounds are namespaces `dynamic_mix.round_<k>`; their count comes from the
schedule (`dataflex.train.schedule`) of the run's parameters; when it depends on the pool's size (`update_times
<= 0` bounded by epochs) one node runs them all."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.params import rounds
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import all_rounds, compute_mixture, finalize, first_segment, next_segment, plot_mixture

INPUTS = ["train_pool", "mixer_eval_sets", "run_config"]
TRAIN_INPUTS = ["train_pool", "mixer_eval_sets", "eval_sets", "run_config"]  # + evaluation during training


def create_pipeline(n_rounds: int | None = None, **kwargs: Any) -> Pipeline:
    n = n_rounds if n_rounds is not None else rounds("dynamic_mix")
    plot = Node(plot_mixture, "train_result", "mixture_plot", name="plot_mixture", namespace="dynamic_mix")
    if n is None:  # the round count depends on the pool's size: all rounds in one node
        run = Node(
            all_rounds, TRAIN_INPUTS, ["train_result", "mixture_history"], name="all_rounds", namespace="dynamic_mix"
        )
        return data_processing() + Pipeline([run, plot], tags="dynamic_mix") + evaluation() + reporting()
    first = Node(first_segment, TRAIN_INPUTS, "state", name="train_segment")
    round_list = [Pipeline([first], namespace="dynamic_mix.round_0", inputs=set(TRAIN_INPUTS))]
    for k in range(1, n):
        nodes = [
            Node(compute_mixture, [*INPUTS, "prev_state"], "mixture", name="compute_mixture"),
            Node(next_segment, [*TRAIN_INPUTS, "prev_state", "mixture"], "state", name="train_segment"),
        ]
        inputs = {**{name: name for name in TRAIN_INPUTS}, "prev_state": f"dynamic_mix.round_{k - 1}.state"}
        round_list.append(Pipeline(nodes, namespace=f"dynamic_mix.round_{k}", inputs=inputs))
    mixtures = [f"dynamic_mix.round_{k}.mixture" for k in range(1, n)]
    last = f"dynamic_mix.round_{n - 1}.state"
    wrap_up = Pipeline(
        [
            Node(
                finalize,
                [last, *mixtures],
                ["train_result", "mixture_history"],
                name="finalize",
                namespace="dynamic_mix",
            ),
            plot,
        ]
    )
    return data_processing() + Pipeline(round_list, tags="dynamic_mix") + wrap_up + evaluation() + reporting()
