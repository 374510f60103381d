"""`dynamic_select`: process -> round_0 (warm-up segment) -> round_k (select_round -> train_segment) ... ->
finalize -> evaluate -> report. Rounds are namespaces `dynamic_select.round_<k>`; their count comes from the
schedule (`dataflex.train.schedule`) of the run's parameters; when it depends on the pool's size (`update_times
<= 0` bounded by epochs) one node runs them all."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.params import rounds
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import all_rounds, finalize, first_segment, next_segment, plot_selection, select_round

INPUTS = ["train_pool", "eval_sets", "run_config"]
SHARED = {"train_pool": "train_pool", "eval_sets": "eval_sets", "run_config": "run_config"}


def create_pipeline(n_rounds: int | None = None, **kwargs: Any) -> Pipeline:
    n = n_rounds if n_rounds is not None else rounds("dynamic_select")
    plot = Node(plot_selection, "train_result", "selection_plot", name="plot_selection", namespace="dynamic_select")
    if n is None:  # the round count depends on the pool's size: all rounds in one node
        outputs = ["train_result", "selection_history"]
        run = Node(all_rounds, INPUTS, outputs, name="all_rounds", namespace="dynamic_select")
        return data_processing() + Pipeline([run, plot], tags="dynamic_select") + evaluation() + reporting()
    first = Node(first_segment, INPUTS, "state", name="train_segment")
    round_list = [Pipeline([first], namespace="dynamic_select.round_0", inputs=SHARED)]
    for k in range(1, n):
        nodes = [
            Node(select_round, [*INPUTS, "prev_state"], ["features", "selection"], name="select"),
            Node(next_segment, [*INPUTS, "prev_state", "selection"], "state", name="train_segment"),
        ]
        prev = {"prev_state": f"dynamic_select.round_{k - 1}.state"}
        round_list.append(Pipeline(nodes, namespace=f"dynamic_select.round_{k}", inputs={**SHARED, **prev}))
    selections = [f"dynamic_select.round_{k}.selection" for k in range(1, n)]
    last = f"dynamic_select.round_{n - 1}.state"
    wrap_up = Pipeline(
        [
            Node(
                finalize,
                [last, *selections],
                ["train_result", "selection_history"],
                name="finalize",
                namespace="dynamic_select",
            ),
            plot,
        ]
    )
    return data_processing() + Pipeline(round_list, tags="dynamic_select") + wrap_up + evaluation() + reporting()
